#!/usr/bin/env python
"""GEM's low-label setting on the embedded SmolLM2-135M-Instruct, end to end, in one command.

    python scripts/demo.py [--out_dir outputs/demo] [--task decision] [--labelled 12] [--unlabelled 8]
                           [--anchor_weight 1] [--task_max_new_tokens 64]

What GEM is for: few labelled pairs, more unlabelled prompts. SFT and DPO get the ``--labelled``
pairs of the training split; GEM gets SFT on the same pairs, then SEGA on those pairs, each group
anchored by its human pair (``--anchor_weight``), and on ``--unlabelled`` further prompts of the
split, prompt-only rows that DPO cannot use. A control run repeats that SEGA with each group's
advantages shuffled at every step (same seeds, settings and compute), which separates learning from
Eq. 1's ranking from learning from sampling itself.

Before SEGA trains, on the SFT model and the labelled pairs only: Eq. 1 is calibrated
(``gates.py --calibrate``: a grid of its settings, k-fold cross-validated, ranking bradley_terry so
that the human pair can anchor the groups), and the gates (:mod:`gem_fast.gates`) run with the
chosen settings: Eq. 1's preference accuracy, the rank correlation of Eq. 1 with correctness of
sampled candidates, and the share of candidates cut off by the token limit. The generation limit is
chosen from them (their 90th percentile length plus a margin); nothing is chosen from held-out
results. Each model is then scored once on ``--eval_pairs`` held-out pairs: preference accuracy
(implicit reward log π, bootstrap interval) and paired bootstrap intervals of GEM's accuracy minus
DPO's, SFT's and the shuffled control's; ``--task_max_new_tokens N`` adds greedy task accuracy (off by
default: about 40 s per model on 2 cores, which the 20-minute budget does not have).

Every stage is the project's own script in a subprocess (its wall time and peak RSS are kept).
Prints the gates and a markdown table and writes them with the raw numbers to
``<out_dir>/results.{md,json}``. Uses CUDA when present.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

from gem_fast.cli.ablation import run_stage, write_training_splits
from gem_fast.config import read_yaml
from gem_fast.eval import paired_bootstrap_ci
from gem_fast.gates import Gates
from gem_fast.kernels import resolve_backend
from gem_fast.data.synthetic import TASKS

ROOT = Path(__file__).resolve().parents[1]
# Settings fixed in advance, the same for every trained stage where they apply (not tuned on held-out pairs).
LR = {"sft": 2e-5, "dpo": 5e-6, "gem": 5e-6}
DPO_BETA = 0.1
GATE_MAX_NEW_TOKENS = 64  # the gates sample with this limit; SEGA's own is chosen from what they see


def write_splits(task: str, out: Path, labelled: int, unlabelled: int, eval_pairs: int) -> tuple[Path, Path, Path]:
    """The labelled pairs, SEGA's rows (those pairs, then the unlabelled prompts as prompt-only rows) and the
    held-out pairs, as files in ``out``."""
    train_rows = (ROOT / "data" / task / "train.jsonl").read_text().splitlines(keepends=True)
    test_rows = (ROOT / "data" / task / "test.jsonl").read_text().splitlines(keepends=True)
    if labelled + unlabelled > len(train_rows) or eval_pairs > len(test_rows):
        raise SystemExit(f"data/{task} has {len(train_rows)} training rows and {len(test_rows)} held-out ones")
    heldout = out / "heldout.jsonl"
    heldout.write_text("".join(test_rows[:eval_pairs]))
    return (*write_training_splits(out, train_rows[:labelled], train_rows[labelled : labelled + unlabelled]), heldout)


def generation_limit(gates: dict) -> int:
    """SEGA's gen_max_new_tokens from the gates' sample: its 90th percentile length plus a quarter, a multiple of 8."""
    return min(GATE_MAX_NEW_TOKENS, 8 * math.ceil(1.25 * gates["length_p90"] / 8))


def _percent(share: float | None) -> str:
    return "not measured" if share is None else f"{100 * share:.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", default="outputs/demo")
    parser.add_argument("--task", choices=TASKS, default="decision", help="built-in task (data/<task>/)")
    parser.add_argument("--labelled", type=int, default=12, help="labelled pairs: SFT, DPO and the gates use them")
    parser.add_argument("--unlabelled", type=int, default=8, help="further prompts, unlabelled, for SEGA")
    parser.add_argument("--anchor_weight", type=float, default=1.0,
                        help="wins of the human chosen over the rejected response in a labelled group's ranking")
    parser.add_argument("--epochs", type=int, default=2, help="passes of SFT and DPO over the labelled pairs")
    parser.add_argument("--batch", type=int, default=2, help="pairs or prompts per optimizer step")
    parser.add_argument("--k", type=int, default=4, help="SEGA candidates per prompt")
    parser.add_argument("--eval_pairs", type=int, default=64, help="held-out pairs to evaluate")
    parser.add_argument("--task_max_new_tokens", type=int, default=0,
                        help="greedy completion limit for task accuracy (0: not measured)")
    args = parser.parse_args(argv)
    out = (ROOT / args.out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: remove it or pass another --out_dir")
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = resolve_backend("auto", device)
    labelled, sega_rows, heldout = write_splits(args.task, out, args.labelled, args.unlabelled, args.eval_pairs)
    t0 = time.perf_counter()

    common = ["--chat_template", "true", "--kernel_backend", backend, "--max_length", "256", "--seed", "0",
              "--lr_decay", "constant", "--batch_size", str(args.batch), "--grad_accum", "1"]
    pairs = ["--train_jsonl", str(labelled), "--epochs", str(args.epochs)]
    sft_model = out / "sft" / "final"
    train = {"SFT": ["scripts/train_sft.py", *pairs, "--out_dir", str(out / "sft"), "--lr", str(LR["sft"]),
                     *common],
             "SFT+DPO": ["scripts/train_sft.py", "--objective", "dpo", "--model_name_or_path", str(sft_model), *pairs,
                         "--out_dir", str(out / "dpo"), "--lr", str(LR["dpo"]), "--beta", str(DPO_BETA), *common]}
    costs = {name: run_stage(cmd, out / f"{name.lower().replace('+', '_')}_train.log") for name, cmd in train.items()}

    # Eq. 1 calibrated, then the gates with its settings: on the SFT model and the labelled pairs only.
    calibrated = out / "eq1.yaml"
    run_stage(["scripts/gates.py", "--calibrate", "--ranking", "bradley_terry", "--model_name_or_path",
               str(sft_model), "--train_jsonl", str(labelled), "--chat_template", "--max_length", "256",
               "--kernel_backend", backend, "--output_yaml", str(calibrated), "--output_json",
               str(out / "calibration.json")], out / "calibration.log")
    calibration = json.loads((out / "calibration.json").read_text())
    eq1 = read_yaml(calibrated)
    print(f"calibrated Eq. 1: {eq1}, cross-validated pair accuracy {100 * calibration['cv_accuracy']:.1f}% "
          f"(95% CI {100 * calibration['cv_ci'][0]:.1f}-{100 * calibration['cv_ci'][1]:.1f}%)"
          + ("" if calibration["beats_chance"] else "; Eq. 1 carries no signal on this data"), flush=True)
    sega_cfg = [f"--{name}={eq1[name]}" for name in ("final_span", "lambda_fork", "top_m", "final_fraction")]
    run_stage(["scripts/gates.py", "--model_name_or_path", str(sft_model), "--train_jsonl", str(labelled),
               "--chat_template", "--k", str(args.k), "--gen_max_new_tokens", str(GATE_MAX_NEW_TOKENS),
               "--kernel_backend", backend, "--output_json", str(out / "gates.json"), *sega_cfg], out / "gates.log")
    gates = json.loads((out / "gates.json").read_text())
    gen_max_new_tokens = generation_limit(gates)
    gate_lines = Gates(**{f.name: gates[f.name] for f in dataclasses.fields(Gates)}).lines()
    print("\n".join(gate_lines), flush=True)
    print(f"SEGA: gen_max_new_tokens {gen_max_new_tokens} (from the gates' 90th percentile length)", flush=True)

    sega = ["scripts/train_sega.py", "--config", str(calibrated), "--model_name_or_path", str(sft_model),
            "--train_jsonl", str(sega_rows), "--epochs", "1", "--lr", str(LR["gem"]), "--k", str(args.k),
            "--gen_max_new_tokens", str(gen_max_new_tokens), "--reward_mapping", "zscore", "--anchor_weight",
            str(args.anchor_weight), "--log_samples_every", "4", *common]
    costs["SFT+GEM"] = run_stage([*sega, "--out_dir", str(out / "gem")], out / "sft_gem_train.log")
    costs["SFT+GEM, shuffled A"] = run_stage([*sega, "--out_dir", str(out / "gem_shuffled"),
                                              "--shuffle_advantages", "true"], out / "sft_gem_shuffled_train.log")

    models = {"base (SmolLM2-135M-Instruct)": None, "SFT": sft_model, "SFT+DPO": out / "dpo" / "final",
              "SFT+GEM": out / "gem" / "final", "SFT+GEM, shuffled A": out / "gem_shuffled" / "final"}
    rows = []
    for name, model_dir in models.items():
        slug = name.split()[0].lower().replace("+", "_").replace(",", "") + ("_shuffled" if "shuffled" in name else "")
        report_path = out / f"{slug}_eval.json"
        eval_args = ["scripts/eval_pref_accuracy.py", "--eval_jsonl", str(heldout), "--beta", "1.0",
                     "--chat_template", "--kernel_backend", backend, "--device", device, "--output_json",
                     str(report_path), "--task_max_new_tokens", str(args.task_max_new_tokens)]
        if model_dir is not None:
            eval_args += ["--model_name_or_path", str(model_dir)]
        eval_cost = run_stage(eval_args, out / f"{slug}_eval.log")
        report = json.loads(report_path.read_text())
        rows.append({"model": name, **report["overall"], "task_accuracy": report.get("task_accuracy"),
                     "correct": report["correct"], "train": costs.get(name), "eval": eval_cost})
        print(f"  {name}: preference accuracy {report['overall']['accuracy']:.3f}", flush=True)
    total = time.perf_counter() - t0

    by_name = {r["model"]: r for r in rows}
    differences = {f"GEM - {other}": paired_bootstrap_ci(by_name["SFT+GEM"]["correct"], by_name[other]["correct"])
                   for other in ("SFT+DPO", "SFT", "SFT+GEM, shuffled A")}
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    lines = [
        f"GEM demo, {date.today()}, {device_name}, kernel backend `{backend}`, task `{args.task}`: "
        f"{args.labelled} labelled pairs (SFT, DPO; epochs {args.epochs}; SEGA, anchored, weight "
        f"{args.anchor_weight}), {args.unlabelled} unlabelled prompts (SEGA, k={args.k}, {gen_max_new_tokens} tokens, "
        f"zscore advantages), {args.eval_pairs} held-out pairs, total {total / 60:.1f} min",
        "",
        "Calibration and gates (SFT model, labelled pairs only):",
        "",
        f"- Eq. 1 calibrated ({calibration['folds']}-fold cross-validation, {len(calibration['settings'])} settings): "
        f"{eq1}; cross-validated pair accuracy {100 * calibration['cv_accuracy']:.1f}% (95% CI "
        f"{100 * calibration['cv_ci'][0]:.1f}-{100 * calibration['cv_ci'][1]:.1f}%)"
        + ("" if calibration["beats_chance"] else "; Eq. 1 carries no signal on this data"),
        *(f"- {line}" for line in gate_lines),
        "",
        "| model | pref. accuracy | 95% CI | task accuracy | train time s | train peak RSS MiB | eval time s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        train_cost = f"{r['train']['seconds']:.0f} | {r['train']['peak_rss_mib']:.0f}" if r["train"] else "– | –"
        lines.append(f"| {r['model']} | {100 * r['accuracy']:.1f}% | {100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}% "
                     f"| {_percent(r['task_accuracy'])} | {train_cost} | {r['eval']['seconds']:.0f} |")
    lines += ["", "| difference (paired bootstrap, same held-out pairs) | points | 95% CI |", "|---|---|---|"]
    lines += [f"| {name} | {100 * d:+.1f} | {100 * lo:+.1f} to {100 * hi:+.1f} |"
              for name, (d, lo, hi) in differences.items()]
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(
        {"device": device_name, "backend": backend, "total_seconds": total, "args": vars(args), "gates": gates,
         "calibration": calibration,
         "gen_max_new_tokens": gen_max_new_tokens, "rows": rows,
         "differences": {k: dict(zip(("difference", "ci_low", "ci_high"), v)) for k, v in differences.items()}},
        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
