"""The divergence guard (gem_fast/guard.py): non-finite and spiking gradients, the AdamW update ratio, and a run
it stops before anything is saved."""

from __future__ import annotations

import pytest
import torch
from cli_runs import one_line_error, train_sft

from gem_fast.config import GuardConfig
from gem_fast.distributed import DistEnv
from gem_fast.guard import DivergenceError, DivergenceGuard, NonFiniteLossError, adamw_update_ratio


CPU_ONE = DistEnv.single("cpu")


def test_lr_1e6_stops_at_step_1_with_nothing_saved(inputs, tmp_path, capsys):
    model_dir, data = inputs
    before = (model_dir / "model.safetensors").read_bytes()
    argv = ["--model_name_or_path", str(model_dir), "--train_jsonl", str(data), "--out_dir", str(tmp_path),
            "--lr", "1e6", "--save_every", "1", "--max_steps", "3", "--batch_size", "2", "--progress", "false"]
    err = one_line_error(capsys, 1, lambda: train_sft(argv))
    assert "step 1: the update's norm is" in err and "limit --max_update_ratio 0.1; lr 1e+06" in err
    assert "the step was not applied; the last checkpoint is none" in err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "model.safetensors").exists()
    assert (model_dir / "model.safetensors").read_bytes() == before


def test_guard_refuses_non_finite_and_spiking_gradients():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    guard = DivergenceGuard(GuardConfig(max_grad_norm_spike=10.0))
    with pytest.raises(NonFiniteLossError, match="step 1: loss 1.0, grad norm nan"):
        guard.check(1, 1.0, float("nan"), optimizer, CPU_ONE, last_good="ckpt")
    for step in range(1, 11):
        assert guard.check(step, 1.0, 1.0 + step / 100, optimizer, CPU_ONE, last_good="ckpt")["update_ratio"] > 0
    with pytest.raises(DivergenceError, match=r"step 11: grad norm 20 is 19 × the median 1.055 of the last 10 "
                                              r"steps \(limit --max_grad_norm_spike 10\); .* last checkpoint is ckpt"):
        guard.check(11, 1.0, 20.0, optimizer, CPU_ONE, last_good="ckpt")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_update_ratio_equals_the_step_adamw_then_takes(weight_decay):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False))
    model[1].weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=weight_decay)
    for _ in range(3):  # the first step (no optimizer state yet) and later ones
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        predicted = adamw_update_ratio(optimizer, CPU_ONE)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
        weights = torch.cat([b.flatten() for b in before])
        assert predicted == pytest.approx((update.norm() / weights.norm()).item(), rel=1e-5)
