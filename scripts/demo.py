#!/usr/bin/env python
"""The whole GEM pipeline on the embedded SmolLM2-135M-Instruct, end to end, in one command.

    python scripts/demo.py [--out_dir outputs/demo] [--steps 16]

Stages, each the project's own script in a subprocess (so each has its own wall time and peak
RSS): preference accuracy of the base model on the held-out arithmetic split; SFT on the
chosen answers; from the SFT model, SEGA (k sampled candidates per prompt with the prompt's KV
cache computed once, entropy scoring, group advantages) and, with the same number of steps and
prompts, DPO; then the accuracy of each. Prints a markdown table and writes it with the raw
numbers to ``<out_dir>/results.{md,json}``. Uses CUDA when present.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from gem_fast.kernels import resolve_backend
from gem_fast.ranking import RATING_METHODS

ROOT = Path(__file__).resolve().parents[1]
TRAIN, TEST = ROOT / "data/arith/train.jsonl", ROOT / "data/arith/test.jsonl"


def run_stage(args: list[str], log_path: Path) -> dict[str, float]:
    """Run ``python args...`` with output to ``log_path``; its wall time (s) and peak RSS (MiB)."""
    cmd = [sys.executable, *args]
    print("$", shlex.join(cmd[1:]), flush=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"stage failed ({log_path}):\n{tail}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", default="outputs/demo")
    # Sized for 15 minutes on 2 CPU cores, where a forward+backward of the 135M model costs
    # about 2 s per 100 tokens: the budget buys a few steps, enough to show the pipeline work.
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of SFT, SEGA and DPO each")
    parser.add_argument("--prompts_per_step", type=int, default=2)
    parser.add_argument("--k", type=int, default=4, help="SEGA candidates per prompt")
    parser.add_argument("--gen_max_new_tokens", type=int, default=40, help="SEGA candidate length cap")
    parser.add_argument("--eval_pairs", type=int, default=64, help="held-out pairs to evaluate")
    parser.add_argument("--ranking", choices=RATING_METHODS, default="score",
                        help="what SEGA's reward mapping receives (train_sega.py --ranking)")
    args = parser.parse_args(argv)
    out = (ROOT / args.out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: remove it or pass another --out_dir")
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = resolve_backend("auto", device)
    # Every trained stage sees the same pairs once: the first steps x prompts_per_step of the
    # training split (DPO also computes its reference log-probs on exactly these).
    train_file = out / "train_pairs.jsonl"
    budget = args.steps * args.prompts_per_step
    train_file.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:budget]))
    common = ["--chat_template", "true", "--kernel_backend", backend, "--max_length", "256",
              "--epochs", "1", "--seed", "0", "--lr_decay", "constant", "--export_hf", "true"]
    batch = ["--batch_size", str(args.prompts_per_step), "--grad_accum", "1"]
    stages = {
        "SFT": ["scripts/train_sft.py", "--train_jsonl", str(train_file), "--out_dir", str(out / "sft"),
                "--lr", "2e-5", *batch, *common],
        "SFT+DPO": ["scripts/train_sft.py", "--objective", "dpo", "--model_name_or_path", str(out / "sft/final"),
                    "--train_jsonl", str(train_file), "--out_dir", str(out / "dpo"), "--lr", "5e-6",
                    "--beta", "0.1", *batch, *common],
        # SEGA's knobs (Eq. 1, rewards, sampler) from its demo YAML; its schedule is replaced by the demo's.
        "SFT+GEM": ["scripts/train_sega.py", "--config", "configs/sega_demo.yaml",
                    "--model_name_or_path", str(out / "sft/final"), "--train_jsonl", str(train_file),
                    "--out_dir", str(out / "gem"), "--lr", "5e-6", "--max_steps", "0", "--warmup_steps", "0",
                    "--save_every", "0", "--ranking", args.ranking, "--k", str(args.k), "--gen_max_new_tokens", str(args.gen_max_new_tokens),
                    *batch, *common],
    }
    # Each trained stage exports its model to <its out_dir>/final (gem_fast.checkpoint.export_hf).
    models = {"base (SmolLM2-135M-Instruct)": None, **{name: out / slug / "final" for name, slug in
                                                       (("SFT", "sft"), ("SFT+DPO", "dpo"), ("SFT+GEM", "gem"))}}
    rows, t0 = [], time.perf_counter()
    for name, model_dir in models.items():
        slug = name.split()[0].lower().replace("+", "_")
        train_cost = run_stage(stages[name], out / f"{slug}_train.log") if name in stages else None
        report_path = out / f"{slug}_eval.json"
        eval_args = ["scripts/eval_pref_accuracy.py", "--eval_jsonl", str(TEST), "--beta", "1.0",
                     "--chat_template", "--limit", str(args.eval_pairs), "--kernel_backend", backend,
                     "--device", device, "--output_json", str(report_path)]
        if model_dir is not None:
            eval_args += ["--model_name_or_path", str(model_dir)]
        eval_cost = run_stage(eval_args, out / f"{slug}_eval.log")
        overall = json.loads(report_path.read_text())["overall"]
        rows.append({"model": name, **overall, "train": train_cost, "eval": eval_cost})
        print(f"  {name}: accuracy {overall['accuracy']:.3f}", flush=True)
    total = time.perf_counter() - t0

    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    lines = [
        f"GEM demo, {date.today()}, {device_name}, kernel backend `{backend}`, {args.steps} steps x "
        f"{args.prompts_per_step} prompts per trained stage (k={args.k}, ranking {args.ranking} for GEM), "
        f"{args.eval_pairs} held-out pairs, total {total / 60:.1f} min",
        "",
        "| model | pref. accuracy | 95% CI | ties | train time s | train peak RSS MiB | eval time s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        train = f"{r['train']['seconds']:.0f} | {r['train']['peak_rss_mib']:.0f}" if r["train"] else "– | –"
        lines.append(
            f"| {r['model']} | {100 * r['accuracy']:.1f}% | {100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}% "
            f"| {r['ties']} | {train} | {r['eval']['seconds']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(
        {"device": device_name, "backend": backend, "total_seconds": total, "args": vars(args), "rows": rows},
        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
