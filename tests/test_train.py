"""Training engine on a tiny Llama (CPU): FSDP2 over 2 gloo processes equals one process; fused loss equals naive;
SIGTERM and Ctrl-C checkpoint and stop the loop."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cli_runs import train_sft
from safetensors.torch import load_file
from tiny_lm import char_tokenizer, join_gloo, run_config, tiny_model, write_run_inputs

import gem_fast.train as train_module
from gem_fast.data import load_preference_jsonl
from gem_fast.logprobs import pair_logprobs, response_targets
from gem_fast.models import load_model_and_tokenizer
from gem_fast.flags import parse_config
from gem_fast.distributed import DistEnv, free_port, parallelize
from gem_fast.objectives import SFT
from gem_fast.objectives.pairs import reference_logprobs
from gem_fast.policy import PolicyLoss
from gem_fast.run_dir import LOCK_NAME
from gem_fast.cli import main
from gem_fast.train import lr_factor, train

CPU_ONE = DistEnv.single("cpu")

# fp32 on CPU; the sharded run only changes reduction order (all-gather, reduce-scatter, chunked kernel).
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
# After Adam steps: Adam divides by sqrt(v), so a coordinate whose gradient is ~0 turns a 1e-7
# gradient difference into up to ~1e-3 of its lr-sized update; lr is 3e-3 in these runs.
WEIGHT_TOL = dict(rtol=1e-4, atol=2e-5)


def _named_grads(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full gradients (gathered from FSDP shards) by parameter name, activation-checkpoint wrappers unnamed."""
    return {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        for n, p in policy.named_parameters()
    }


def _worker(rank: int, world: int, port: int, model_dir: Path, data: Path, root: Path) -> None:
    join_gloo(rank, world, port)
    try:
        # One micro-step of step 0, by hand, to read the gradients before the optimizer uses them.
        cfg = run_config(model_dir, data, root / "sharded", batch_size=2)
        model, tokenizer = load_model_and_tokenizer(str(model_dir))
        total_numel = sum(p.numel() for p in model.parameters())
        # Activation checkpointing on here; train() below runs without it: both paths meet the reference.
        policy = parallelize(PolicyLoss(model.train(), backend="torch"), activation_checkpointing=True, sharded=True,
                             device=torch.device("cpu"))
        local_numel = sum(p.to_local().numel() for p in policy.parameters())
        d = DistEnv(rank, world, torch.device("cpu"), True)
        (mb,), _ = SFT(cfg, d, load_preference_jsonl(data), tokenizer).step_batches(policy, 0)
        loss = policy(mb.batch.input_ids, mb.batch.attention_mask, mb.batch.response_mask, mb.token_weights)
        loss.backward()
        grads = _named_grads(policy)
        loss = loss.detach()
        dist.all_reduce(loss)
        # DPO's reference table scored by the sharded policy (weights untouched so far); 15 pairs
        # leave rank 1 one short, so its slice is padded.
        reference_logprobs(policy, load_preference_jsonl(data)[:15], tokenizer, cfg.run, d, root / "reference.safetensors")
        result = train(cfg)  # the full engine: 3 steps, then the HF export
        if rank == 0:
            torch.save({"loss": loss / world, "grads": grads, "total_numel": total_numel, "losses": result.losses},
                       root / "rank0.pt")
        # Each rank also reports its own parameter share.
        torch.save(local_numel, root / f"numel_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Inputs, plus the 2-rank gloo run's step-0 loss/grads, training losses and export."""
    root = tmp_path_factory.mktemp("fsdp")
    model_dir, data = write_run_inputs(root)
    mp.spawn(_worker, args=(2, free_port(), model_dir, data, root), nprocs=2, join=True)
    return model_dir, data, root, torch.load(root / "rank0.pt")


def _naive_step0(model_dir: Path, data: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 0's global batch (4 rows) on the unwrapped model with full [N, L, V] logits and autograd."""
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    cfg = run_config(model_dir, data, Path("unused"), batch_size=4)
    (mb,), _ = SFT(cfg, CPU_ONE, load_preference_jsonl(data), tokenizer).step_batches(PolicyLoss(model), 0)
    batch = mb.batch
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model.train()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
    ).logits
    targets = response_targets(batch)
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    valid = targets != -100
    loss = -(logp * valid).sum() / valid.sum()
    loss.backward()
    # PolicyLoss names parameters "model.<hf name>"; the tied lm_head is the embedding.
    return loss.detach(), {f"model.{n}": p.grad for n, p in model.named_parameters()}


@pytest.mark.slow
def test_fsdp_two_ranks_match_naive_single_process(two_process_run):
    model_dir, data, root, rank0 = two_process_run
    naive_loss, naive_grads = _naive_step0(model_dir, data)
    # (3) the fused loss inside the FSDP root forward equals the full-logits loss of the plain model
    print("step-0 loss |FSDP fused - naive|:", (rank0["loss"] - naive_loss).abs().item(),
          "max grad |diff|:", max((rank0["grads"][n] - g).abs().max().item() for n, g in naive_grads.items()))
    torch.testing.assert_close(rank0["loss"], naive_loss, **LOSS_TOL)
    # (1) gradients after FSDP's reduce-scatter equal the single-process gradients
    assert rank0["grads"].keys() == naive_grads.keys()
    for name, grad in naive_grads.items():
        torch.testing.assert_close(rank0["grads"][name], grad, **GRAD_TOL, msg=lambda m: f"{name}: {m}")
    # each rank holds about half of the parameters (dim-0 shards, rounded up per tensor)
    shares = [torch.load(root / f"numel_rank{r}.pt") for r in range(2)]
    assert sum(shares) == rank0["total_numel"]
    assert all(abs(s / rank0["total_numel"] - 0.5) < 0.05 for s in shares)


@pytest.mark.slow
def test_reference_logprobs_sharded_equal_one_process(two_process_run):
    model_dir, data, root, _ = two_process_run
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    pairs = load_preference_jsonl(data)[:15]
    want = pair_logprobs(model, tokenizer, pairs, batch_size=3, max_length=512, backend="naive")
    got = load_file(root / "reference.safetensors")
    for name in ("chosen", "rejected"):
        torch.testing.assert_close(got[name], getattr(want, name), **LOSS_TOL, msg=lambda m: f"{name}: {m}")
    for name in ("chosen_tokens", "rejected_tokens"):
        assert torch.equal(got[name], getattr(want, name)), name


def test_reference_logprobs_cache_is_keyed_by_data_and_settings(tmp_path):
    model_dir, data = write_run_inputs(tmp_path, n_pairs=6)
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    pairs, cache = load_preference_jsonl(data), tmp_path / "ref.safetensors"
    cfg = run_config(model_dir, data, tmp_path / "out", batch_size=4)
    policy = PolicyLoss(model, backend="torch")
    first = reference_logprobs(policy, pairs, tokenizer, cfg.run, CPU_ONE, cache)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # a resumed run's policy is no longer the reference
    resumed = cfg.replace(resume=True)
    again = reference_logprobs(policy, pairs, tokenizer, resumed.run, CPU_ONE, cache)
    assert torch.equal(again.chosen, first.chosen) and torch.equal(again.rejected, first.rejected)
    # A fresh run scores again; so does a resume whose data file or settings changed.
    fresh = reference_logprobs(policy, pairs, tokenizer, cfg.run, CPU_ONE, cache)
    assert not torch.allclose(fresh.chosen, first.chosen)
    with torch.no_grad():
        model.lm_head.weight.div_(2.0)
    reference_logprobs(policy, pairs, tokenizer, cfg.run, CPU_ONE, cache)  # the cache holds `first` again
    with data.open("a") as f:
        f.write(data.read_text().splitlines(keepends=True)[0])  # same first 6 pairs, other file contents
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    edited = reference_logprobs(policy, pairs, tokenizer, resumed.run, CPU_ONE, cache)
    assert not torch.allclose(edited.chosen, first.chosen)
    with torch.no_grad():
        model.lm_head.weight.div_(2.0)  # rescored with the reference weights (rows are < 64 tokens)...
    other = reference_logprobs(policy, pairs, tokenizer, resumed.replace(max_length=64).run, CPU_ONE, cache)
    torch.testing.assert_close(other.chosen, first.chosen)  # ...not read back as `edited`


@pytest.mark.slow
def test_fsdp_two_ranks_train_like_one_process(two_process_run, tmp_path):
    model_dir, data, root, rank0 = two_process_run
    single = train(run_config(model_dir, data, tmp_path / "single", batch_size=4))
    gap = (torch.tensor(rank0["losses"]) - torch.tensor(single.losses)).abs().max().item()
    print("2-rank vs 1-process loss max |diff|:", gap)
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(single.losses), **LOSS_TOL)
    sharded_w = load_file(root / "sharded" / "final" / "model.safetensors")
    single_w = load_file(tmp_path / "single" / "final" / "model.safetensors")
    assert sharded_w.keys() == single_w.keys()
    for name in single_w:
        torch.testing.assert_close(sharded_w[name], single_w[name], **WEIGHT_TOL, msg=lambda m: f"{name}: {m}")
    # the export reloads as a plain HF model
    reloaded, _ = load_model_and_tokenizer(str(root / "sharded" / "final"))
    assert isinstance(reloaded, type(tiny_model(char_tokenizer())))


def test_activation_checkpointing_keeps_loss_and_grads(tmp_path):
    model_dir, data = write_run_inputs(tmp_path, n_pairs=4)
    cfg = run_config(model_dir, data, tmp_path, batch_size=4)
    results = []
    for ac in (False, True):
        model, tokenizer = load_model_and_tokenizer(str(model_dir))
        policy = parallelize(PolicyLoss(model.train(), backend="torch"), activation_checkpointing=ac, sharded=False,
                             device=torch.device("cpu"))
        (mb,), _ = SFT(cfg, CPU_ONE, load_preference_jsonl(data), tokenizer).step_batches(policy, 0)
        loss = policy(mb.batch.input_ids, mb.batch.attention_mask, mb.batch.response_mask, mb.token_weights)
        loss.backward()
        results.append((loss.detach(), _named_grads(policy)))
    (loss_plain, grads_plain), (loss_ac, grads_ac) = results
    torch.testing.assert_close(loss_ac, loss_plain, rtol=0, atol=0)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ac[name], grad, rtol=1e-6, atol=1e-7)


def test_lr_schedule_warmup_then_decay():
    kw = dict(warmup=2, total=10, min_ratio=0.1)
    assert [lr_factor(s, decay="cosine", **kw) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(10, decay="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(6, decay="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(6, decay="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(9, decay="constant", **kw) == 1.0


def test_script_flags_override_yaml(tmp_path):
    model_dir, data = write_run_inputs(tmp_path, n_pairs=4)
    config = tmp_path / "run.yaml"
    config.write_text(f"train_jsonl: {data}\nmodel_name_or_path: {model_dir}\nlr: 1e-3\nbatch_size: 2\n"
                      "k: 3\nreward_mapping: identity\ngen_max_new_tokens: 4\n")
    out = tmp_path / "out"
    flags = ["--out_dir", str(out), "--lr", "2e-3", "--max_steps", "1", "--export_hf", "false", "--progress", "false"]
    code = main(["--config", str(config), *flags], objective="sega", description="test")
    assert code == 0
    saved = json.loads((out / "train_config.json").read_text())
    chosen = (saved["lr"], saved["batch_size"], saved["k"], saved["objective"], saved["export_hf"])
    assert chosen == (2e-3, 2, 3, "sega", False)
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["step"] == 1 and {"score_mean", "adv_abs_mean", "entropy_mean"} <= record.keys()
    # SEGA knobs are not SFT flags, in YAML or on the command line
    with pytest.raises(SystemExit):
        parse_config(["--config", str(config)], objective="sft", description="test")
    with pytest.raises(SystemExit):
        parse_config(["--k", "2"], objective="sft", description="test")


@pytest.mark.parametrize("objective, beta, first_loss", [("dpo", 0.1, math.log(2.0)), ("ipo", 0.5, 1.0)])
def test_preference_objectives_start_at_the_reference(tmp_path, objective, beta, first_loss):
    """At step 1 the policy is its reference: margin 0, so DPO gives log 2 and IPO (1/(2β))²;
    a reference log-prob looked up for the wrong pair would move the first loss far off."""
    model_dir, data = write_run_inputs(tmp_path)
    cfg = run_config(model_dir, data, tmp_path / "out", objective=objective, beta=beta, batch_size=2, grad_accum=2,
                     export_hf=False, lr=3e-4, max_steps=2)
    result = train(cfg)
    assert result.losses[0] == pytest.approx(first_loss, abs=1e-5)
    assert result.losses[-1] < result.losses[0]
    parsed = parse_config(["--objective", objective, "--beta", str(beta)], objective="sft", description="t")
    assert (parsed.run.objective, parsed.pair.beta) == (objective, beta)


def test_sft_trains_alike_on_pair_completion_and_chat_rows(tmp_path):
    """A chat row's earlier messages are its prompt through the chat template: the same tokens, so the same loss,
    as the pair (its chosen) or the {prompt, completion} row with --chat_template."""
    model_dir, data = write_run_inputs(tmp_path, n_pairs=4)
    tokenizer = char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<a>"
    tokenizer.save_pretrained(model_dir)
    pairs = [json.loads(line) for line in data.read_text().splitlines()]
    rows = {"completion": [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs],
            "chat": [{"messages": [{"role": "user", "content": p["prompt"]},
                                   {"role": "assistant", "content": p["chosen"]}]} for p in pairs]}
    losses = {}
    for name, path in [("pairs", data), *((n, tmp_path / f"{n}.jsonl") for n in rows)]:
        if name in rows:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        cfg = run_config(model_dir, path, tmp_path / name, batch_size=2, max_steps=2, export_hf=False,
                         chat_template=name != "chat")
        losses[name] = train(cfg).losses
    assert losses["pairs"] == losses["completion"] == losses["chat"]


def test_sigterm_checkpoints_and_exits_143_without_a_traceback(inputs, tmp_path, monkeypatch, capsys):
    model_dir, data = inputs

    def sigterm_at_step_1(done: int, record: dict, policy: torch.nn.Module) -> None:
        if done == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 2; the loop stops after it

    monkeypatch.setattr(train_module, "train", functools.partial(train, on_step=sigterm_at_step_1))
    argv = ["--model_name_or_path", str(model_dir), "--train_jsonl", str(data), "--out_dir", str(tmp_path),
            "--max_steps", "5", "--progress", "false", "--export_hf", "false"]
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert train_sft(argv) == 128 + signal.SIGTERM
    finally:  # main leaves a no-op SIGTERM handler for the process's exit
        signal.signal(signal.SIGTERM, handler)
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_signal_stops_sega_between_micro_steps_and_the_resumed_run_matches(inputs, tmp_path, monkeypatch):
    model_dir, data = inputs
    kw = dict(objective="sega", k=2, gen_max_new_tokens=4, batch_size=1, grad_accum=3, max_steps=3, export_hf=False)
    full = train(run_config(model_dir, data, tmp_path / "full", **kw))
    samples = []
    sample = PolicyLoss.sample
    monkeypatch.setattr(PolicyLoss, "sample", lambda self, *a, **k: samples.append(1) or sample(self, *a, **k))

    def sigint_after_step_1(done: int, record: dict, policy: torch.nn.Module) -> None:
        if done == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C; step 2 then samples its first micro-step only

    stopped = train(run_config(model_dir, data, tmp_path / "run", **kw), on_step=sigint_after_step_1)
    assert (stopped.stopped_by_signal, stopped.steps_done, len(samples)) == (signal.SIGINT, 1, 3 + 1)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000001"]
    resumed = train(run_config(model_dir, data, tmp_path / "run", **kw, resume=True))
    assert resumed.losses == pytest.approx(full.losses[1:], rel=1e-6)


def _start_training(tmp_path: Path, inputs, script: str, out: Path, *flags: str) -> tuple[subprocess.Popen, Path]:
    """``scripts/<script>`` on the tiny model for far more steps than the test waits for; its stderr file."""
    model_dir, data = inputs
    root = Path(__file__).resolve().parents[1]
    err = tmp_path / f"{out.name}-stderr.txt"
    argv = [sys.executable, str(root / "scripts" / script), "--model_name_or_path", str(model_dir),
            "--train_jsonl", str(data), "--out_dir", str(out), "--epochs", "1000", "--progress", "false", *flags]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err.open("w"), env=env), err


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], what: str) -> None:
    for _ in range(1200):
        if ready():
            return
        assert proc.poll() is None, f"the run ended before {what}"
        subprocess.run(["sleep", "0.1"])
    proc.kill()
    pytest.fail(f"never saw {what}")


ANNOUNCED = "SIGINT: stopping after this step with a checkpoint; resume with --resume (Ctrl-C again stops at once)"


@pytest.mark.slow
def test_ctrl_c_is_acknowledged_checkpoints_the_step_and_a_second_one_stops_at_once(inputs, tmp_path):
    out = tmp_path / "sft"
    proc, err = _start_training(tmp_path, inputs, "train_sft.py", out, "--save_every", "4")
    metrics = out / "metrics.jsonl"
    _wait_for(proc, lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 1, "step 2")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    text = err.read_text()
    assert text.count(ANNOUNCED) == 1 and "Traceback" not in text, text
    steps = len(metrics.read_text().splitlines())
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == f"step_{steps:08d}"  # nothing lost
    assert not (out / LOCK_NAME).exists()

    # A SEGA step on the CPU samples for seconds: the second Ctrl-C lands inside it and does not wait for it.
    out = tmp_path / "sega"
    proc, err = _start_training(tmp_path, inputs, "train_sega.py", out, "--k", "2", "--gen_max_new_tokens", "256")
    _wait_for(proc, lambda: "global batch" in err.read_text(), "the first step")
    proc.send_signal(signal.SIGINT)
    _wait_for(proc, lambda: ANNOUNCED in err.read_text(), "the announcement")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    text = err.read_text()
    assert text.strip().splitlines()[-1] == ("train_sega.py: error: stopped at once by a second Ctrl-C; the last "
                                            "checkpoint is kept (--resume continues from it)"), text
    assert "Traceback" not in text and not (out / LOCK_NAME).exists()
    # It landed inside step 1, or (a loaded machine, candidates that hit EOS early) inside step 1's save:
    # either way no step is logged beyond 1 and a save it cut short left only its ``.tmp_`` folder.
    steps = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
    complete = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else []
    assert steps <= 1 and all(int(name.removeprefix("step_")) <= steps for name in complete), (steps, complete)
