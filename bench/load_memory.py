"""Host memory per rank through model loading and one training step: ``--init meta`` sharded over 2 gloo ranks
against one process loading the whole model (``--init full``).

    python -m bench.load_memory --out DIR     # writes DIR/load_memory.{json,md}

A random Llama of about 500M parameters (:data:`SHAPE`, the embedded SmolLM2's tokenizer) is
saved as fp32 safetensors in a temporary folder. Each run is the engine itself
(:func:`gem_fast.train.train`, SFT) in fresh processes: one optimizer step (AdamW) of 1 x 128
tokens per rank, no checkpoint, no export. A run's figure is each process's resident high-water
mark (``VmHWM`` in ``/proc/self/status``, the process's own: ``ru_maxrss`` would carry the
launcher's) read after the step, so it covers the loading and the step. Runs:

- ``unsharded``: ``python -m bench.load_memory --worker --init full`` (one process, no process group);
- ``meta``: ``torchrun --nproc_per_node 2 -m bench.load_memory --worker --init meta``;
- ``full_sharded``: the same with ``--init full`` (the path before meta init), for comparison.

A peak is a single sample per rank (a high-water mark does not need warm-up; the step count is
fixed). The planner's host-memory prediction per rank (:func:`gem_fast.memory_plan.host_load_bytes`)
is written beside each measurement. Goal: every meta rank <= 0.65 x the unsharded peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from gem_fast.memory_plan import host_load_bytes
from gem_fast.shapes import ModelShape

from .common import environment, peak_rss_bytes, random_llama, write_results

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20
WORLD = 2
TOKENS = 128
GOAL_RATIO = 0.65
RUN_TIMEOUT_S = 900
# 516M parameters (tied [49152, 1536] embedding, 16 layers); fp32: 2.1 GB per full copy.
SHAPE = ModelShape("llama-516m", hidden=1536, layers=16, heads=12, kv_heads=4, head_dim=128, intermediate=4608,
                   vocab=49152, tied=True)


def _write_inputs(folder: Path) -> tuple[Path, Path]:
    """The random model + tokenizer as an HF folder, and a JSONL of ``WORLD`` pairs each longer than ``TOKENS``."""
    from gem_fast.models import load_tokenizer

    tokenizer = load_tokenizer(None)
    if len(tokenizer) != SHAPE.vocab:
        raise RuntimeError(f"the embedded tokenizer has {len(tokenizer)} tokens, SHAPE expects {SHAPE.vocab}")
    model_dir = folder / "model"
    model = random_llama(SHAPE, torch.device("cpu"))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    # A short prompt and a long answer: each row is cut to TOKENS tokens, nearly all of them scored.
    answer = " ".join(f"step {i}: add {i} and {2 * i} to get {3 * i}." for i in range(40))
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {r}: sum the numbers.", "chosen": answer,
                                        "rejected": answer[::-1]}) + "\n" for r in range(WORLD)))
    return model_dir, data


def _worker(args: argparse.Namespace) -> None:
    """One rank (or the one process) of a run: the engine's step, then this process's VmHWM to ``args.report``."""
    from gem_fast.config import TrainConfig
    from gem_fast.train import train

    cfg = TrainConfig.from_flat(dict(
        model_name_or_path=args.model, train_jsonl=args.data, out_dir=args.run_dir, init=args.init, max_steps=1,
        batch_size=1, max_length=TOKENS, lr=1e-5, export_hf=False, progress=False, save_every=0))
    train(cfg)
    rank = int(os.environ.get("RANK", 0))
    (Path(args.report) / f"rank{rank}.json").write_text(json.dumps({"peak_mb": peak_rss_bytes() / MB}))


def _run(name: str, launcher: list[str], init: str, model: Path, data: Path, scratch: Path) -> list[float]:
    """Peak MB of each rank of one run (rank order)."""
    report = scratch / name
    report.mkdir()
    cmd = [*launcher, "--worker", "--init", init, "--model", str(model), "--data", str(data),
           "--run_dir", str(scratch / f"{name}_out"), "--report", str(report)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=RUN_TIMEOUT_S)
    peaks = [json.loads(p.read_text())["peak_mb"] for p in sorted(report.glob("rank*.json"))]
    print(f"  {name}: peak MB per rank {[round(p) for p in peaks]}", flush=True)
    return peaks


def _markdown(doc: dict) -> str:
    env, unsharded = doc["environment"], doc["unsharded_peak_mb"]
    lines = [
        f"Host memory through loading + one step, {SHAPE.params() / 1e6:.0f}M-parameter Llama (fp32 safetensors), "
        f"1 x {TOKENS} tokens per rank, {env['device']}, {env['date'][:10]}",
        "",
        "| run | processes | peak RSS per rank MB | / unsharded | planner's load estimate MB |",
        "|---|---|---|---|---|",
        f"| one process, `--init full` | 1 | {unsharded:.0f} | 1.00 | {doc['planned_load_mb']['full_1']:.0f} |",
    ]
    for key, label in (("per_rank_peak_mb", "`--init meta`"), ("full_sharded_per_rank_peak_mb", "`--init full`")):
        peaks = doc[key]
        lines.append(f"| {WORLD} gloo ranks, {label} | {WORLD} | {' / '.join(f'{p:.0f}' for p in peaks)} | "
                     f"{max(peaks) / unsharded:.2f} | {doc['planned_load_mb'][key]:.0f} |")
    lines += ["", f"Goal: every `--init meta` rank <= {GOAL_RATIO} x the unsharded peak: "
                  f"{'met' if doc['goal_met'] else 'NOT met'} ({doc['max_ratio']:.2f})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for load_memory.{json,md} (default: print only)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--init", choices=("meta", "full"), help=argparse.SUPPRESS)
    for name in ("--model", "--data", "--run_dir", "--report"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    single = [sys.executable, "-m", "bench.load_memory"]
    sharded = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               "-m", "bench.load_memory"]
    with tempfile.TemporaryDirectory(prefix="gem_fast_load_memory-") as tmp:
        scratch = Path(tmp)
        model, data = _write_inputs(scratch)
        unsharded = _run("unsharded", single, "full", model, data, scratch)[0]
        meta = _run("meta", sharded, "meta", model, data, scratch)
        full_sharded = _run("full_sharded", sharded, "full", model, data, scratch)
    planned = {"full_1": host_load_bytes(SHAPE, world_size=1, init="full", source_element=4) / MB,
               "per_rank_peak_mb": host_load_bytes(SHAPE, world_size=WORLD, init="meta", source_element=4) / MB,
               "full_sharded_per_rank_peak_mb": host_load_bytes(SHAPE, world_size=WORLD, init="full", source_element=4) / MB}
    max_ratio = max(meta) / unsharded
    doc = {"unsharded_peak_mb": unsharded, "per_rank_peak_mb": meta, "world_size": WORLD,
           "full_sharded_per_rank_peak_mb": full_sharded, "max_ratio": max_ratio,
           "goal_met": max_ratio <= GOAL_RATIO, "planned_load_mb": planned, "parameters": SHAPE.params(),
           "tokens_per_rank": TOKENS, "environment": environment(torch.device("cpu"))}
    table = _markdown(doc)
    print(table)
    if args.out is not None:
        write_results(args.out, "load_memory", doc, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
