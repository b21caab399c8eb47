"""The memory planner (gem_fast.plan.memory) against measured CPU peaks, and its Llama-3-8B prediction.

    python -m bench.memory_plan              # measure the CPU cases, write bench/results/cpu/memory_plan.{json,md}
    python -m bench.memory_plan --quick      # the loss-heavy pair only, printed, nothing written

Each training case is one real step of a random Llama built from a LlamaConfig, with the
engine's pieces: ``PolicyLoss`` wrapped by ``parallelize`` (activation checkpointing, FSDP2 over
gloo when world > 1), forward + backward + AdamW step + ``zero_grad(set_to_none=True)``, on a
padded batch (a quarter of each row is prompt, the last row's half left padding; the rest is
scored response). Gradient clipping is left out: it allocates one 0-dim norm per tensor. A
warm-up step on a tiny batch creates the AdamW states first, so the measured step is the steady
state the planner models. A sampling case measures SEGA's ``sample_group`` call instead.

Measurement: one fresh interpreter imports torch/transformers/gem_fast once and warms the code
paths up on a tiny model, then forks one process per case and rank, so every case starts from
the same clean heap without paying the imports again. In each child: ``RSS0`` after
``malloc_trim`` before the model exists; ``static`` = RSS when the measured call starts
(parameters + AdamW states) - RSS0; ``step`` = the call's resident high-water mark (``VmHWM``
reset through ``/proc/self/clear_refs``) - RSS at its start. The probe runs with a fixed glibc
mmap threshold of 128 KiB, so every larger tensor is its own mapping, returned on free: RSS then
follows live tensors, as ``torch.cuda.max_memory_allocated`` does on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import queue
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gem_fast.config import TrainConfig, read_yaml
from gem_fast.distributed import free_port
from gem_fast.plan.memory import GIB, markdown_table, plan_memory
from gem_fast.plan.workload import Sampling, Setup, setup_from_train_config
from gem_fast.plan.shapes import ModelShape, model_shape

from gem_fast.models import tiny_llama

from .common import PeakMemory, environment, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"
ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
MMAP_THRESHOLD = 128 * 1024  # bytes: every larger allocation is its own mapping, returned on free
CASE_TIMEOUT_S = 600

# Small Llamas whose step memory (hundreds of MB) stands well above RSS noise, a few seconds a step.
WIDE_VOCAB = ModelShape("wide-vocab", hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64,
                        intermediate=1024, vocab=32768, tied=True)
DEEP = ModelShape("deep", hidden=256, layers=8, heads=4, kv_heads=2, head_dim=64,
                  intermediate=1024, vocab=8192, tied=True)
WIDE = ModelShape("wide", hidden=512, layers=2, heads=8, kv_heads=4, head_dim=64,
                  intermediate=2048, vocab=32768, tied=True)
PARAMS = ModelShape("params", hidden=512, layers=4, heads=8, kv_heads=4, head_dim=64,
                    intermediate=4096, vocab=8192, tied=False)
KV = ModelShape("kv", hidden=256, layers=8, heads=8, kv_heads=8, head_dim=64,
                intermediate=512, vocab=8192, tied=True)

Case = tuple[str, ModelShape, Setup]


def _response_len(seq_len: int) -> int:
    """Scored tokens per row of :func:`_batch`: all but the first quarter (the prompt)."""
    return seq_len - seq_len // 4


def _cpu(**kw: Any) -> Setup:
    return Setup(device="cpu", response_len=_response_len(kw["seq_len"]), **kw)


def _sega(**sampling: int) -> Setup:
    """The sampling call of a SEGA micro-step on the CPU (what is measured for such a case)."""
    s = Sampling(**sampling)
    return Setup(device="cpu", micro_batch=s.prompts * s.k, seq_len=s.prompt_len + s.new_tokens,
                 response_len=s.new_tokens, sampling=s)


CASES: list[Case] = [
    ("loss-heavy naive", WIDE_VOCAB, _cpu(micro_batch=2, seq_len=1024, loss="naive")),
    ("loss-heavy fused", WIDE_VOCAB, _cpu(micro_batch=2, seq_len=1024, loss="fused")),
    ("activation-heavy fused", DEEP, _cpu(micro_batch=4, seq_len=512, loss="fused")),
    ("activation-heavy fused, AC", DEEP, _cpu(micro_batch=4, seq_len=512, loss="fused", activation_checkpointing=True)),
    ("activation-heavy naive, AC", DEEP, _cpu(micro_batch=4, seq_len=512, loss="naive", activation_checkpointing=True)),
    ("parameter-heavy fused", PARAMS, _cpu(micro_batch=1, seq_len=64, loss="fused")),
    ("1 rank fused", WIDE, _cpu(micro_batch=2, seq_len=512, loss="fused")),
    ("FSDP2 2 ranks fused", WIDE, _cpu(world_size=2, micro_batch=2, seq_len=512, loss="fused")),
    ("SEGA sampling, decode-heavy", KV, _sega(prompts=4, k=8, prompt_len=512, new_tokens=64)),
    ("SEGA sampling, prefill-heavy", KV, _sega(prompts=4, k=2, prompt_len=1024, new_tokens=8)),
]
QUICK = CASES[:2]


# ------------------------------------------------------------------------------------------------
# Child side: runs inside the probe interpreter (python -m bench.memory_plan --probe CASES.json).


def _settle(meter: PeakMemory) -> int:
    """Collect garbage, then reset the meter's resident high-water mark; returns VmRSS."""
    gc.collect()
    return meter.start()


def _batch(vocab: int, rows: int, seq_len: int, seed: int):
    """input_ids, attention_mask, response_mask [rows, L] and token weights [rows, L-1]: the first
    quarter of each row is prompt (the last row's left half of it padding), the rest response,
    so every row scores ``seq_len - seq_len // 4`` tokens (:func:`_response_len`)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq_len), generator=g)
    mask = torch.ones(rows, seq_len, dtype=torch.long)
    mask[-1, : seq_len // 8] = 0
    ids[mask == 0] = 0
    response = torch.zeros(rows, seq_len, dtype=torch.bool)
    response[:, seq_len // 4:] = True
    weights = response[:, 1:].float()
    return ids, mask, response, weights / weights.sum()


def _build_policy(shape: ModelShape, setup: Setup):
    from gem_fast.distributed import parallelize
    from gem_fast.policy import PolicyLoss

    model = tiny_llama(shape=shape, init_std=0.02).train()
    backend = "naive" if setup.loss == "naive" else "torch"
    policy = parallelize(PolicyLoss(model, backend=backend), activation_checkpointing=setup.activation_checkpointing,
                         sharded=setup.sharded, device=torch.device("cpu"))
    params = [p for p in policy.parameters() if p.requires_grad]
    return policy, torch.optim.AdamW(params, lr=1e-4)


def _step(policy, optimizer, batch) -> None:
    loss = policy(*batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sample(policy, vocab: int, sampling: Sampling, seed: int) -> None:
    """SEGA's sampling call as the SEGA objective (``gem_fast.objectives.sega``) makes it: left-padded prompts, top-p 0.95,
    no EOS, so every candidate runs ``new_tokens`` steps."""
    ids, mask, _, _ = _batch(vocab, sampling.prompts, sampling.prompt_len, seed)
    generator = torch.Generator().manual_seed(seed)
    policy.eval()
    policy.sample(ids, mask, k=sampling.k, max_new_tokens=sampling.new_tokens, temperature=1.0, top_p=0.95,
                  eos_token_id=None, pad_token_id=0, generator=generator, progress=False)
    policy.train()


def _run_case(shape: ModelShape, setup: Setup, rank: int, port: int, results) -> None:
    """One rank of one case in a forked child: build, warm-up step, then the measured training step
    (or, for a case with ``sampling``, the measured ``sample_group`` call); report bytes."""

    if setup.sharded:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(setup.world_size), LOCAL_RANK=str(rank))
        dist.init_process_group("gloo")
    try:
        _warm_up(setup)
        meter = PeakMemory(torch.device("cpu"))
        rss0 = _settle(meter)
        policy, optimizer = _build_policy(shape, setup)
        _step(policy, optimizer, _batch(shape.vocab, 1, 16, seed=rank))  # creates the AdamW states
        if setup.sampling is None:
            batch = _batch(shape.vocab, setup.micro_batch, setup.seq_len, seed=100 + rank)
            measured = lambda: _step(policy, optimizer, batch)  # noqa: E731
        else:
            measured = lambda: _sample(policy, shape.vocab, setup.sampling, seed=100 + rank)  # noqa: E731
        start = _settle(meter)
        began = time.perf_counter()
        measured()
        seconds = time.perf_counter() - began
        step = meter.peak()
        results.put({"rank": rank, "static_bytes": start - rss0, "step_bytes": step,
                     "peak_bytes": start + step - rss0, "step_s": seconds})
    finally:
        if setup.sharded:
            dist.destroy_process_group()


TINY = ModelShape("tiny", hidden=64, layers=1, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                  vocab=512, tied=True)


def _warm_up(setup: Setup) -> None:
    """Two steps of a tiny model with ``setup``'s loss, checkpointing and sharding (and a sampling call).

    Run in the probe before forking, it does the lazy imports once; run again in each child
    before its baseline, it maps the shared-library pages those code paths touch: a forked
    child starts without the parent's file-backed pages in its page tables, and faulting them
    in would count as resident growth.
    """
    policy, optimizer = _build_policy(TINY, replace(setup, micro_batch=2, seq_len=32, response_len=None, sampling=None))
    for _ in range(2):
        _step(policy, optimizer, _batch(TINY.vocab, 2, 32, seed=0))
    if setup.sampling is not None:
        _sample(policy, TINY.vocab, Sampling(prompts=2, k=2, prompt_len=16, new_tokens=4), seed=0)


def _probe(cases: list[tuple[ModelShape, Setup]]) -> list[list[dict]]:
    torch.set_num_threads(1)  # also keeps the forks free of OpenMP worker threads
    for loss in ("naive", "fused"):
        _warm_up(Setup(device="cpu", loss=loss, activation_checkpointing=True))
    fork = multiprocessing.get_context("fork")
    out = []
    for shape, setup in cases:
        results = fork.Queue()
        port = free_port()
        procs = [fork.Process(target=_run_case, args=(shape, setup, rank, port, results))
                 for rank in range(setup.world_size)]
        for p in procs:
            p.start()
        ranks: list[dict] = []
        deadline = time.monotonic() + CASE_TIMEOUT_S
        while len(ranks) < len(procs):
            try:
                ranks.append(results.get(timeout=1))
            except queue.Empty:
                # A dead rank would leave the others waiting in a collective.
                if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                    for p in procs:
                        p.kill()
                    raise RuntimeError(f"measurement of {shape.name} {setup} failed or timed out") from None
        for p in procs:
            p.join()
        out.append(sorted(ranks, key=lambda r: r["rank"]))
    return out


# ------------------------------------------------------------------------------------------------
# Parent side.


def _setup_from_dict(d: dict) -> Setup:
    sampling = d.pop("sampling")
    return Setup(**d, sampling=Sampling(**sampling) if sampling else None)


def measure(cases: list[Case]) -> list[list[dict]]:
    """Measured bytes per rank of each case, from one fresh probe interpreter (see the module doc)."""
    spec = json.dumps([[asdict(shape), asdict(setup)] for _, shape, setup in cases])
    # A fixed mmap threshold turns off glibc's dynamic one, which after the first large free would
    # serve tensors up to 32 MiB from the heap, where freed pages stay resident until trimmed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    proc = subprocess.run([sys.executable, "-m", "bench.memory_plan", "--probe", spec], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(case: Case, ranks: list[dict]) -> dict:
    """Predicted vs measured bytes of one case: static (params + AdamW states) and the measured
    call above it (the training step's phases, or the sampling phases for a sampling case)."""
    name, shape, setup = case
    plan = plan_memory(shape, setup)
    sampling = setup.sampling is not None
    phase = max((p for p in plan.phases if p.name.startswith("SEGA") == sampling), key=lambda p: p.bytes)
    measured_peak = max(r["peak_bytes"] for r in ranks)
    return {
        "case": name, "shape": asdict(shape), "setup": asdict(setup),
        "predicted": {"static_bytes": plan.static_bytes, "step_bytes": phase.bytes - plan.static_bytes,
                      "peak_bytes": phase.bytes, "peak_phase": phase.name,
                      "phases": {p.name: p.bytes for p in plan.phases}},
        "measured": {"ranks": ranks, "static_bytes": max(r["static_bytes"] for r in ranks),
                     "step_bytes": max(r["step_bytes"] for r in ranks), "peak_bytes": measured_peak},
        "step_ratio": max(r["step_bytes"] for r in ranks) / (phase.bytes - plan.static_bytes),
        "peak_ratio": measured_peak / phase.bytes,
    }


def _validation_table(rows: list[dict]) -> str:
    lines = ["| case | model | batch per rank | world | predicted static / step / peak MiB "
             "| measured static / step / peak MiB | measured / predicted peak | predicted peak phase |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        p, m, s = r["predicted"], r["measured"], r["setup"]
        fmt = lambda d: " / ".join(f"{d[k] / MIB:.0f}" for k in ("static_bytes", "step_bytes", "peak_bytes"))  # noqa: E731
        sampled = s["sampling"]
        batch = (f"{sampled['prompts']} prompts × k={sampled['k']}, {sampled['prompt_len']} + "
                 f"{sampled['new_tokens']} tokens" if sampled else f"{s['micro_batch']} × {s['seq_len']}"
                 + (", AC" if s["activation_checkpointing"] else ""))
        lines.append(f"| {r['case']} | {r['shape']['name']} (H={r['shape']['hidden']}, {r['shape']['layers']} layers, "
                     f"V={r['shape']['vocab']}) | {batch} | {s['world_size']} | {fmt(p)} | {fmt(m)} "
                     f"| {r['peak_ratio']:.2f} | {p['peak_phase']} |")
    return "\n".join(lines)


def llama3_8b_predictions() -> tuple[list[dict], str]:
    """Llama-3-8B on 8×A100-80GB (FSDP2, bf16, Liger layers): the SEGA YAML's setting, then SFT
    sweeps over micro-batch, sequence length and activation checkpointing; FlashAttention unless
    the row says SDPA. Returns the JSON records and a markdown table (GiB per GPU, allowances in)."""
    shape = model_shape("llama3-8b")
    sega = read_yaml(ROOT / "configs" / "llama3_8b_sega_8gpu.yaml")
    settings: list[tuple[str, Setup]] = [
        (f"SEGA YAML{'' if ac else ', AC off'}: 2 prompts × k=5{', prompts repeated' if sharing == 'off' else ', prefix-shared'}",
         setup_from_train_config(TrainConfig.from_flat({**sega, "activation_checkpointing": ac,
                                                        "prefix_sharing": sharing}),
                                 world_size=8, loss="fused", device="cuda"))
        for sharing in ("off", "auto") for ac in (True, False)
    ]
    for seq_len in (2048, 4096):
        for rows in (1, 2, 4):
            for ac in (True, False):
                settings.append(("SFT", Setup(world_size=8, micro_batch=rows, seq_len=seq_len,
                                              activation_checkpointing=ac, device="cuda")))
    for ac in (True, False):
        settings.append(("SFT, SDPA", Setup(world_size=8, micro_batch=2, seq_len=4096, activation_checkpointing=ac,
                                            device="cuda", attention="sdpa")))
    records, lines = [], [
        "| run | rows × tokens per GPU | AC | naive: peak GiB (phase) | fused: peak GiB (phase) | fits 80 GiB naive / fused |",
        "|---|---|---|---:|---:|---|"]
    for label, setup in settings:
        plans = {loss: plan_memory(shape, replace(setup, loss=loss)) for loss in ("naive", "fused")}
        fits = " / ".join("yes" if p.total_bytes <= 80 * GIB else "**no**" for p in plans.values())
        cells = " | ".join(f"{p.total_bytes / GIB:.1f} ({p.peak_phase.name})" for p in plans.values())
        lines.append(f"| {label} | {setup.micro_batch} × {setup.seq_len} | "
                     f"{'on' if setup.activation_checkpointing else 'off'} | {cells} | {fits} |")
        records.append({"label": label, "setup": asdict(setup),
                        **{loss: {"total_bytes": p.total_bytes, "peak_phase": p.peak_phase.name,
                                  "phases": {ph.name: ph.bytes for ph in p.phases}} for loss, p in plans.items()}})
    yaml_plans = {loss: plan_memory(shape, replace(settings[0][1], loss=loss)) for loss in ("naive", "fused")}
    return records, ("\n".join(lines) + "\n\nTerm by term, the SEGA YAML's setting "
                     "(`python scripts/plan_memory.py --world_size 8 --config configs/llama3_8b_sega_8gpu.yaml`):\n\n"
                     + markdown_table(yaml_plans, 80))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="measure the loss-heavy naive/fused pair only; print, write nothing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: JSON cases, run in this interpreter
    args = parser.parse_args(argv)
    if args.probe:
        cases = [(ModelShape(**shape), _setup_from_dict(setup)) for shape, setup in json.loads(args.probe)]
        print(json.dumps(_probe(cases)))
        return 0

    cases = QUICK if args.quick else CASES
    began = time.perf_counter()
    rows = [compare(case, ranks) for case, ranks in zip(cases, measure(cases))]
    records, prediction = llama3_8b_predictions()
    doc = {"environment": environment(torch.device("cpu")), "wall_s": time.perf_counter() - began,
           "validation": rows, "llama3_8b_8xA100_80GB_prediction": records}
    md = (
        "# Memory planner (gem_fast.plan.memory)\n\n"
        f"## Predicted vs measured, CPU ({doc['environment']['device']}, fp32, 1 thread per rank)\n\n"
        "One training step (forward + backward + AdamW step) of a random Llama through PolicyLoss + parallelize "
        "(FSDP2 over gloo for 2 ranks), or one SEGA `sample_group` call, measured as resident-set growth in a "
        "forked process per rank: *static* = parameters + AdamW states above the process before the model "
        "existed, *step* = the high-water mark of the measured call above that. Predictions: the largest "
        "phase of the measured call, without the allowances. `python -m bench.memory_plan`.\n\n"
        + _validation_table(rows)
        + "\n\n## Prediction, not a measurement: Llama-3-8B on 8×A100-80GB\n\n"
        "FSDP2 per decoder layer + root, bf16 parameters / fp32 gradient reduction, fp32 master weights and AdamW "
        "states, Liger RMSNorm/RoPE/SwiGLU, FlashAttention (`pip install .[flash]`; SDPA rows: without it), the "
        "fused loss on the Triton backend. GiB per GPU including the fixed allowances (CUDA context 0.5, NCCL "
        "0.5, allocator slack 2.0). SEGA rows include the sampling phase (whole model gathered in bf16) and "
        "score the 256 generated tokens of each 1024 + 256-token row; SFT rows score every position (no "
        "sampling phase). `python scripts/plan_memory.py --model llama3-8b --world_size 8 ...` prints any "
        "row term by term.\n\n"
        + prediction + "\n"
    )
    if not args.quick:
        write_results(args.out, "memory_plan", doc, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
