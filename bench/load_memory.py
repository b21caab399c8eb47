"""Host memory per rank through model loading and one training step: ``--init meta`` sharded over 2 gloo ranks
against one process loading the whole model (``--init full``).

    python -m bench.load_memory --out DIR     # writes DIR/load_memory.{json,md}

A random Llama of about 500M parameters (:data:`SHAPE`, the embedded SmolLM2's tokenizer) is
saved as bf16 safetensors in a temporary folder, as models ship; the engine trains in fp32
(2.1 GB per full copy). With fp32 files transformers would leave the whole-model path's weights
as views of the memory-mapped file, paged in only as they are used. Each run is the engine itself
(:func:`gem_fast.train.train`, SFT) in fresh processes: one optimizer step (AdamW) of 1 x 128
tokens per rank, no checkpoint, no export. A run's figure is each process's resident high-water
mark (``VmHWM`` in ``/proc/self/status``, the process's own: ``ru_maxrss`` would carry the
launcher's) read after the step, so it covers the loading and the step. Runs:

- ``unsharded``: ``python -m bench.load_memory --worker --init full`` (one process, no process group);
- ``meta``: ``torchrun --nproc_per_node 2 -m bench.load_memory --worker --init meta``;
- ``full_sharded``: the same with ``--init full`` (the path before meta init), for comparison.

A peak is a single sample per rank (a high-water mark does not need warm-up; the step count is
fixed). The planner's host-memory prediction per rank (:func:`gem_fast.plan.memory.host_load_bytes`)
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
from typing import Any

import torch

from gem_fast.plan.memory import host_load_bytes
from gem_fast.plan.shapes import ModelShape

from gem_fast.models import tiny_llama

from .common import environment, peak_rss_bytes, rss_bytes, write_results

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20
WORLD = 2
TOKENS = 128
GOAL_RATIO = 0.65
RUN_TIMEOUT_S = 900
# 516M parameters (tied [49152, 1536] embedding, 16 layers); fp32: 2.1 GB per full copy, bf16 files 1.0 GB.
SHAPE = ModelShape("llama-516m", hidden=1536, layers=16, heads=12, kv_heads=4, head_dim=128, intermediate=4608,
                   vocab=49152, tied=True)


def _write_inputs(folder: Path) -> tuple[Path, Path]:
    """The random model + tokenizer as an HF folder, and a JSONL of ``WORLD`` pairs each longer than ``TOKENS``."""
    from gem_fast.models import load_tokenizer

    tokenizer = load_tokenizer(None)
    if len(tokenizer) != SHAPE.vocab:
        raise RuntimeError(f"the embedded tokenizer has {len(tokenizer)} tokens, SHAPE expects {SHAPE.vocab}")
    model_dir = folder / "model"
    model = tiny_llama(shape=SHAPE, init_std=0.02).to(torch.bfloat16)
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
    """One rank (or the one process) of a run: the engine's step; to ``args.report`` this process's RSS before
    the run and its VmHWM when the model is loaded and sharded (``build_policy`` returned) and after the step."""
    from gem_fast import train as engine
    from gem_fast.config import TrainConfig

    cfg = TrainConfig.from_flat(dict(
        model_name_or_path=args.model, train_jsonl=args.data, out_dir=args.run_dir, init=args.init, max_steps=1,
        batch_size=1, max_length=TOKENS, lr=1e-5, export_hf=False, progress=False, save_every=0))
    peaks = {"start_mb": rss_bytes() / MB}  # interpreter, torch, transformers: before any model exists
    build_policy = engine.build_policy

    def build_and_record(*args: Any, **kwargs: Any) -> Any:
        built = build_policy(*args, **kwargs)
        peaks["load_peak_mb"] = peak_rss_bytes() / MB
        return built

    engine.build_policy = build_and_record  # the loop calls it through the module: the load's high-water mark
    engine.train(cfg)
    peaks["peak_mb"] = peak_rss_bytes() / MB
    (Path(args.report) / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(peaks))


def _run(name: str, launcher: list[str], init: str, model: Path, data: Path, scratch: Path) -> list[dict]:
    """``{"start_mb", "load_peak_mb", "peak_mb"}`` of each rank of one run (rank order)."""
    report = scratch / name
    report.mkdir()
    cmd = [*launcher, "--worker", "--init", init, "--model", str(model), "--data", str(data),
           "--run_dir", str(scratch / f"{name}_out"), "--report", str(report)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=RUN_TIMEOUT_S)
    peaks = [json.loads(p.read_text()) for p in sorted(report.glob("rank*.json"))]
    print(f"  {name}: peak MB per rank (loaded, after the step) "
          f"{[(round(p['load_peak_mb']), round(p['peak_mb'])) for p in peaks]}", flush=True)
    return peaks


def _markdown(doc: dict) -> str:
    env, unsharded = doc["environment"], doc["unsharded_peak_mb"]
    lines = [
        f"Host memory (peak RSS) per rank, {SHAPE.params() / 1e6:.0f}M-parameter Llama from bf16 safetensors (fp32 in "
        f"training), "
        f"one AdamW step of 1 x {TOKENS} tokens per rank, {env['device']}, {env['date'][:10]}",
        "",
        "| run | at start MB | loaded + sharded MB | / unsharded | planner: start + load MB | after the step MB "
        "| / unsharded |",
        "|---|---|---|---|---|---|---|",
    ]
    runs = (("unsharded", "one process, `--init full`", [unsharded]),
            ("per_rank_peak_mb", f"{WORLD} gloo ranks, `--init meta`", doc["per_rank_peak_mb"]),
            ("full_sharded_per_rank_peak_mb", f"{WORLD} gloo ranks, `--init full`", doc["full_sharded_per_rank_peak_mb"]))
    unsharded_load = doc["load_peak_mb"]["unsharded"][0]
    for key, label, step in runs:
        load, start = doc["load_peak_mb"][key], doc["start_mb"][key]
        lines.append(f"| {label} | {' / '.join(f'{p:.0f}' for p in start)} | {' / '.join(f'{p:.0f}' for p in load)} "
                     f"| {max(load) / unsharded_load:.2f} | {max(start) + doc['planned_load_mb'][key]:.0f} | "
                     f"{' / '.join(f'{p:.0f}' for p in step)} | {max(step) / unsharded:.2f} |")
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
        runs = {"unsharded": _run("unsharded", single, "full", model, data, scratch),
                "per_rank_peak_mb": _run("meta", sharded, "meta", model, data, scratch),
                "full_sharded_per_rank_peak_mb": _run("full_sharded", sharded, "full", model, data, scratch)}
    unsharded, meta = runs["unsharded"][0]["peak_mb"], [r["peak_mb"] for r in runs["per_rank_peak_mb"]]
    planned = {"unsharded": host_load_bytes(SHAPE, world_size=1, init="full", source_element=2) / MB,
               "per_rank_peak_mb": host_load_bytes(SHAPE, world_size=WORLD, init="meta", source_element=2) / MB,
               "full_sharded_per_rank_peak_mb": host_load_bytes(SHAPE, world_size=WORLD, init="full", source_element=2) / MB}
    max_ratio = max(meta) / unsharded
    doc = {"unsharded_peak_mb": unsharded, "per_rank_peak_mb": meta, "world_size": WORLD,
           "full_sharded_per_rank_peak_mb": [r["peak_mb"] for r in runs["full_sharded_per_rank_peak_mb"]],
           "start_mb": {key: [r["start_mb"] for r in ranks] for key, ranks in runs.items()},
           "load_peak_mb": {key: [r["load_peak_mb"] for r in ranks] for key, ranks in runs.items()},
           "max_ratio": max_ratio, "goal_met": max_ratio <= GOAL_RATIO, "planned_load_mb": planned,
           "parameters": SHAPE.params(),
           "tokens_per_rank": TOKENS, "environment": environment(torch.device("cpu"))}
    table = _markdown(doc)
    print(table)
    if args.out is not None:
        write_results(args.out, "load_memory", doc, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
