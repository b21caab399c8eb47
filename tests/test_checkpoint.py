"""Sharded checkpoints: kill-and-resume reproduces the uninterrupted run; bad data and NaN losses stop cleanly."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from tiny_lm import run_config

from gem_fast.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gem_fast.train import NonFiniteLossError, train


def _sigterm_during(step: int):
    """SIGTERM arriving while ``step`` runs (sent from the previous step's hook); the run stops after it."""

    def on_step(done: int, record: dict, policy: torch.nn.Module) -> None:
        if done == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
    return on_step


@pytest.mark.parametrize(
    "objective, batch",
    # 4 rows (SFT) or prompts (SEGA: one sampling call per micro-step, the slow part) per step:
    # 4 steps per epoch over 16 pairs: stopped after step 2, resumed for 3..5 across an epoch boundary.
    [("sft", dict(batch_size=2, grad_accum=2)), ("sega", dict(batch_size=4, grad_accum=1)),
     ("dpo", dict(batch_size=2, grad_accum=2))],
)
def test_kill_and_resume_matches_uninterrupted(inputs, tmp_path, objective, batch):
    model_dir, data = inputs
    kw = dict(objective=objective, epochs=2, max_steps=5, warmup_steps=2, k=2, gen_max_new_tokens=4, export_hf=False,
              **batch)
    full = train(run_config(model_dir, data, tmp_path / "full", **kw))
    stopped = train(run_config(model_dir, data, tmp_path / "cut", **kw), on_step=_sigterm_during(2))
    assert stopped.stopped_by_signal == signal.SIGTERM and stopped.steps_done == 2
    assert stopped.checkpoint.name == "step_00000002"
    resumed = train(run_config(model_dir, data, tmp_path / "cut", resume=True, **kw))
    assert resumed.steps_done == 5
    # Same process, same fp32 CPU kernels and data order: the resumed losses are bit-identical.
    assert stopped.losses == full.losses[:2]
    assert resumed.losses == full.losses[2:]
    logged = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]


def test_nan_loss_stops_with_last_checkpoint_intact(inputs, tmp_path):
    model_dir, data = inputs
    cfg = run_config(model_dir, data, tmp_path, batch_size=2, max_steps=4, save_every=2)
    state = {}

    def poison(done: int, record: dict, policy: torch.nn.Module) -> None:
        if done == 2:
            ckpt = latest_checkpoint(tmp_path / "checkpoints")
            state["files"] = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
            # The next forward sees a NaN weight, as after a diverged update.
            with torch.no_grad():
                policy.model.model.norm.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="step 3: loss nan"):
        train(cfg, on_step=poison)
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt.name == "step_00000002"
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == state["files"]
    assert not any(p.name.startswith(".tmp_") for p in (tmp_path / "checkpoints").iterdir())
    resumed = train(run_config(model_dir, data, tmp_path, batch_size=2, max_steps=4, resume=True, export_hf=False))
    assert resumed.steps_done == 4 and all(map(torch.isfinite, torch.tensor(resumed.losses)))


@pytest.mark.parametrize(
    "line, error",
    [
        ('{"prompt": "q", "chosen": "a", "rejected": ', "invalid JSON"),
        ('{"prompt": "q", "chosen": "a"}', "missing field 'rejected'"),
        ('{"prompt": "q", "chosen": "  ", "rejected": "b"}', "field 'chosen' is empty"),
    ],
)
def test_bad_data_stops_before_training_with_file_and_line(tmp_path, line, error):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    # A model folder that cannot load (an empty config.json): the data check must fail before anything loads.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    cfg = run_config(tmp_path / "model", data, tmp_path / "out")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: {error}"):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_checkpoint_roundtrip_restores_rng_and_ignores_partial_saves(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, optimizer, {"step": step}, keep_last=2)
    expected_draw = torch.rand(3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = optimizer.state[model.weight]["exp_avg"].clone()
    (tmp_path / ".tmp_step_00000009").mkdir()  # a save killed before its rename
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp_step_00000009", "step_00000002", "step_00000003"]
    assert latest_checkpoint(tmp_path).name == "step_00000003"

    with torch.no_grad():
        model.weight.zero_()
    optimizer.state[model.weight]["exp_avg"].zero_()
    torch.rand(5)
    state = load_checkpoint(latest_checkpoint(tmp_path), model, optimizer)
    assert state == {"step": 3}
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name])
    assert torch.equal(optimizer.state[model.weight]["exp_avg"], exp_avg)
    assert torch.equal(torch.rand(3), expected_draw)
