"""The GEM paper's ablation as one command: SFT only, full GEM, without the terminal entropy term, without the
branching term, Cognitive Filtering + DPO, and the shuffled-advantage control, scored on the same held-out pairs.

    python scripts/ablation.py [--out_dir outputs/ablation] [--task decision] [--labelled 12] [--unlabelled 8]

Every row starts from one SFT model trained on the labelled pairs. Eq. 1 is calibrated on those pairs
(``gates.py --calibrate``, ranking bradley_terry so that the human pair can anchor the groups); nothing
is chosen from held-out results, and the held-out file is written only after calibration. The GEM
rows then train on the labelled pairs (human-anchored groups, ``--anchor_weight``) and the unlabelled
prompts (k-candidate groups) with the same seed, data and steps:

=============================  ==========================================================
full GEM                        SEGA with the calibrated Eq. 1
w/o terminal entropy            the same, ``--final_weight 0``
w/o branching entropy           the same, ``--lambda_fork 0``
Cognitive Filtering + DPO       the same groups ranked once, DPO on top/bottom (``--filtered_dpo``)
full GEM, shuffled A            the same, each group's advantages permuted every step
=============================  ==========================================================

Each model is scored once on the held-out pairs (preference accuracy with its implicit reward log π, a
bootstrap interval); each row's difference from full GEM is a paired bootstrap over the same pairs.
Writes ``<out_dir>/results.{md,json}`` and ``<out_dir>/ablation.png``. With ``--model_name_or_path``,
``--labelled_jsonl``/``--unlabelled_jsonl``/``--eval_jsonl``, ``--config`` (a training YAML, e.g.
``configs/llama3_8b_sega_8gpu.yaml``) and ``--launcher "torchrun --nproc_per_node 8"`` it is the
paper's setting on 8 GPUs. Every stage is the project's own script in a subprocess (wall time and
peak RSS kept); run from the repository root's checkout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import torch
import yaml

from gem_fast.config import SamplingConfig, SegaConfig, parse_bool, read_yaml
from gem_fast.errors import UsageError, add_debug_flag, entry_point, input_file, number, output_dir
from gem_fast.eval import paired_bootstrap_ci
from gem_fast.kernels import resolve_backend
from gem_fast.data.synthetic import TASKS

ROOT = Path(__file__).resolve().parents[2]
FULL = "full GEM"
# The paper's rows after full GEM: the flags each adds to full GEM's SEGA run.
VARIANTS = {"w/o terminal entropy": ["--final_weight", "0"], "w/o branching entropy": ["--lambda_fork", "0"],
            "Cognitive Filtering + DPO": ["--filtered_dpo", "true"], "full GEM, shuffled A": ["--shuffle_advantages",
                                                                                             "true"]}


def run_stage(args: Sequence[str], log_path: Path, launcher: Sequence[str] = ()) -> dict[str, float]:
    """Run ``python args...`` (after ``launcher``, e.g. torchrun) from the repository root with output to
    ``log_path``; its wall time (s) and peak RSS (MiB, the largest process's). Exits with the log's tail on
    failure."""
    cmd = [*launcher, *(() if launcher else (sys.executable,)), *args]
    print("$", shlex.join(cmd), flush=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"stage failed ({log_path}):\n{tail}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def _rows(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]


def write_training_splits(out: Path, labelled_rows: list[str], unlabelled_rows: list[str]) -> tuple[Path, Path]:
    """``labelled.jsonl`` (the pairs) and ``gem_train.jsonl`` (the pairs, then the prompts as prompt-only rows)."""
    labelled, mixed = out / "labelled.jsonl", out / "gem_train.jsonl"
    labelled.write_text("".join(labelled_rows))
    mixed.write_text("".join(labelled_rows) + "".join(json.dumps({"prompt": json.loads(r)["prompt"]}) + "\n"
                                                      for r in unlabelled_rows))
    return labelled, mixed


def _sega_only() -> set[str]:
    """Flat names only train_sega.py takes: the sampling and SEGA fields, and ``beta`` (its reward temperature)."""
    return {f.name for section in (SamplingConfig, SegaConfig) for f in dataclasses.fields(section)} | {"beta"}


def stage_config(out: Path, name: str, extra: str | None, calibrated: Path | None = None) -> Path:
    """``<out>/<name>.yaml`` for a training stage: the ``--config`` file's fields (if any), then either only those
    SFT takes (``calibrated`` None) or all of them with the calibrated Eq. 1 fields over them."""
    fields = read_yaml(extra) if extra else {}
    if calibrated is None:
        fields = {k: v for k, v in fields.items() if k not in _sega_only()}
    else:
        fields.update(read_yaml(calibrated))
    path = out / f"{name}.yaml"
    path.write_text(f"# {extra or 'no --config'}{f' + {calibrated.name} (calibrated Eq. 1)' if calibrated else ''}\n"
                    + yaml.safe_dump(fields, sort_keys=False))
    return path


def plot(rows: list[dict], path: Path, title: str) -> str:
    """A bar chart of the rows' preference accuracy with their 95 % intervals; what was written, or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    scored = [r for r in rows if "accuracy" in r]
    acc = [100 * r["accuracy"] for r in scored]
    err = [[a - 100 * r["ci_low"] for a, r in zip(acc, scored)], [100 * r["ci_high"] - a for a, r in zip(acc, scored)]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(scored)), acc, yerr=err, capsize=4, color="tab:blue")
    ax.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(scored)), [r["model"] for r in scored], rotation=20, ha="right")
    ax.set_ylabel("held-out preference accuracy, %")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", default="outputs/ablation", help="folder of the run (must be empty or new)")
    p.add_argument("--task", choices=TASKS, default="decision", help="built-in task (data/<task>/) when no data "
                                                                    "files are given")
    p.add_argument("--labelled", type=number(int, at_least=2), default=12, help="labelled pairs from the task's "
                                                                                "training split")
    p.add_argument("--unlabelled", type=number(int, at_least=0), default=8,
                   help="further training prompts, unlabelled, for the GEM rows")
    p.add_argument("--eval_pairs", type=number(int, at_least=1), default=64, help="held-out pairs scored")
    p.add_argument("--labelled_jsonl", default=None, help="labelled pairs (instead of the task's)")
    p.add_argument("--unlabelled_jsonl", default=None, help="unlabelled prompts, {prompt} rows (instead of the task's)")
    p.add_argument("--eval_jsonl", default=None, help="held-out pairs (instead of the task's)")
    p.add_argument("--model_name_or_path", default=None, help="base model (default: the embedded SmolLM2-135M)")
    p.add_argument("--config", default=None, help="training YAML for every stage (e.g. the 8-GPU one); the "
                                                  "calibrated Eq. 1 fields win over its own")
    p.add_argument("--launcher", default="", help='training stages run under this, e.g. "torchrun --nproc_per_node 8"')
    p.add_argument("--chat_template", type=parse_bool, default=True, metavar="BOOL",
                   help="prompts in the chat template")
    p.add_argument("--epochs", type=number(int, at_least=1), default=2, help="SFT passes over the labelled pairs")
    p.add_argument("--batch", type=number(int, at_least=1), default=None,
                   help="pairs or prompts per optimizer step (default: 2, or --config's batch_size x grad_accum)")
    p.add_argument("--k", type=number(int, at_least=2), default=None, help="candidates per prompt (default: 4, or "
                                                                           "--config's)")
    p.add_argument("--gen_max_new_tokens", type=number(int, at_least=1), default=None,
                   help="tokens per candidate (default: 64, or --config's)")
    p.add_argument("--anchor_weight", type=number(float, above=0), default=1.0,
                   help="wins of the human chosen over the rejected response in a labelled group's ranking")
    p.add_argument("--max_length", type=number(int, at_least=2), default=None,
                   help="tokens per row (default: 256, or --config's)")
    p.add_argument("--lr_sft", type=number(float, above=0), default=2e-5)
    p.add_argument("--lr_gem", type=number(float, above=0), default=5e-6)
    p.add_argument("--dpo_beta", type=number(float, above=0), default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernel_backend", default="auto")
    add_debug_flag(p)
    return p.parse_args(argv)


def _sources(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """The labelled, unlabelled and held-out rows, checked before anything runs."""
    given = [args.labelled_jsonl, args.unlabelled_jsonl, args.eval_jsonl]
    if any(given) and not all(given):
        raise UsageError("--labelled_jsonl, --unlabelled_jsonl and --eval_jsonl go together")
    if all(given):
        labelled, unlabelled, heldout = (_rows(input_file(path, flag)) for path, flag in zip(
            given, ("--labelled_jsonl", "--unlabelled_jsonl", "--eval_jsonl")))
        return labelled, unlabelled, heldout[: args.eval_pairs]
    train = _rows(input_file(ROOT / "data" / args.task / "train.jsonl", "--task"))
    test = _rows(input_file(ROOT / "data" / args.task / "test.jsonl", "--task"))
    if args.labelled + args.unlabelled > len(train) or args.eval_pairs > len(test):
        raise UsageError(f"--task {args.task}: {len(train)} training rows and {len(test)} held-out ones, fewer than "
                         f"--labelled + --unlabelled {args.labelled + args.unlabelled} or --eval_pairs "
                         f"{args.eval_pairs}")
    return train[: args.labelled], train[args.labelled : args.labelled + args.unlabelled], test[: args.eval_pairs]


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    labelled_rows, unlabelled_rows, heldout_rows = _sources(args)
    # Shape flags given, or (without --config) the embedded model's defaults; else --config decides.
    shape = {} if args.config else {"batch_size": 2, "grad_accum": 1, "max_length": 256, "k": 4,
                                    "gen_max_new_tokens": 64}
    shape.update({name: value for name, value in (("batch_size", args.batch), ("max_length", args.max_length),
                                                  ("k", args.k), ("gen_max_new_tokens", args.gen_max_new_tokens))
                  if value is not None})
    if args.batch is not None:
        shape["grad_accum"] = 1
    configured = {**(read_yaml(args.config) if args.config else {}), **shape}  # a bad file stops here
    out = output_dir(Path(args.out_dir).resolve(), "--out_dir")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out_dir {out} is not empty: remove it or pass another --out_dir")
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = resolve_backend(args.kernel_backend, device)
    launcher = shlex.split(args.launcher)
    labelled, mixed = write_training_splits(out, labelled_rows, unlabelled_rows)
    t0 = time.perf_counter()

    base = [] if args.model_name_or_path is None else ["--model_name_or_path", args.model_name_or_path]
    common = ["--chat_template", str(args.chat_template).lower(), "--kernel_backend", backend, "--seed",
              str(args.seed), "--lr_decay", "constant", "--progress", "false",
              *(f"--{k}={v}" for k, v in shape.items() if k not in ("k", "gen_max_new_tokens"))]
    sft_model = out / "sft" / "final"
    sft_yaml = stage_config(out, "sft", args.config)
    costs = {"SFT only": run_stage(["scripts/train_sft.py", *base, "--config", str(sft_yaml), "--train_jsonl",
                                    str(labelled), "--epochs", str(args.epochs), "--out_dir", str(out / "sft"), "--lr",
                                    str(args.lr_sft), *common], out / "sft_train.log", launcher)}

    # Eq. 1 calibrated on the labelled pairs of the SFT model; the held-out file does not exist yet.
    calibrated = out / "eq1.yaml"
    run_stage(["scripts/gates.py", "--calibrate", "--ranking", "bradley_terry", "--model_name_or_path",
               str(sft_model), "--train_jsonl", str(labelled), "--max_length", str(configured.get("max_length", 512)),
               "--kernel_backend",
               backend, "--output_yaml", str(calibrated), "--output_json", str(out / "calibration.json"),
               *(["--chat_template"] if args.chat_template else [])], out / "calibration.log")
    calibration = json.loads((out / "calibration.json").read_text())
    print(f"calibrated Eq. 1: {calibration['chosen']}, cross-validated pair accuracy "
          f"{100 * calibration['cv_accuracy']:.1f}%", flush=True)

    sega = ["scripts/train_sega.py", "--config", str(stage_config(out, "sega", args.config, calibrated)),
            "--model_name_or_path", str(sft_model),
            "--train_jsonl", str(mixed), "--epochs", "1", "--lr", str(args.lr_gem), "--reward_mapping", "zscore",
            "--anchor_weight", str(args.anchor_weight), "--dpo_beta", str(args.dpo_beta), *common,
            *(f"--{k}={shape[k]}" for k in ("k", "gen_max_new_tokens") if k in shape)]
    skipped = {}
    for name, extra in {FULL: [], **VARIANTS}.items():
        if name == "w/o terminal entropy" and calibration["chosen"]["lambda_fork"] == 0:
            skipped[name] = "not run: the calibrated lambda_fork is 0, so without the terminal term Eq. 1 has none"
            continue
        slug = _slug(name)
        costs[name] = run_stage([*sega, *extra, "--out_dir", str(out / slug)], out / f"{slug}_train.log", launcher)

    heldout = out / "heldout.jsonl"
    heldout.write_text("".join(heldout_rows))
    models = {"SFT only": sft_model, **{name: out / _slug(name) / "final" for name in costs if name != "SFT only"}}
    rows = []
    for name in ["SFT only", FULL, *VARIANTS]:
        if name in skipped:
            rows.append({"model": name, "note": skipped[name]})
            continue
        report_path = out / f"{_slug(name)}_eval.json"
        eval_cost = run_stage(["scripts/eval_pref_accuracy.py", "--model_name_or_path", str(models[name]),
                               "--eval_jsonl", str(heldout), "--beta", "1.0", "--kernel_backend", backend, "--device",
                               device, "--max_length", str(configured.get("max_length", 512)), "--progress", "false",
                               "--output_json",
                               str(report_path), *(["--chat_template"] if args.chat_template else [])],
                              out / f"{_slug(name)}_eval.log")
        report = json.loads(report_path.read_text())
        rows.append({"model": name, **report["overall"], "correct": report["correct"], "train": costs[name],
                     "eval": eval_cost})
    total = time.perf_counter() - t0
    table = _table(args, rows, calibration, device, total, len(labelled_rows), configured.get("k", SamplingConfig.k))
    title = f"GEM ablation, {len(heldout_rows)} held-out pairs, {date.today()}"
    print(table)
    print(plot(rows, out / "ablation.png", title))
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "device": device, "backend": backend,
                                                  "total_seconds": total, "calibration": calibration, "rows": rows},
                                                 indent=2) + "\n")
    return 0


def _slug(name: str) -> str:
    """A row's folder name: "w/o terminal entropy" -> "w_o_terminal_entropy"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _table(args: argparse.Namespace, rows: list[dict], calibration: dict, device: str, total: float, labelled: int,
           k: int) -> str:
    full = next(r for r in rows if r["model"] == FULL)
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    model = args.model_name_or_path or "SmolLM2-135M-Instruct"
    lines = [f"GEM ablation, {date.today()}, {device_name}, model `{model}`: "
             f"{labelled} labelled pairs, {len(rows[0]['correct'])} held-out pairs, k={k}, "
             f"anchor_weight {args.anchor_weight}, calibrated Eq. 1 {calibration['chosen']} (cross-validated pair "
             f"accuracy {100 * calibration['cv_accuracy']:.1f}%, 95% CI {100 * calibration['cv_ci'][0]:.1f}-"
             f"{100 * calibration['cv_ci'][1]:.1f}%), total {total / 60:.1f} min", "",
             "| row | pref. accuracy | 95% CI | minus full GEM (paired) | 95% CI | train time s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['model']} | {r['note']} | | | | |")
            continue
        d, lo, hi = paired_bootstrap_ci(r["correct"], full["correct"])
        diff = "–" if r is full else f"{100 * d:+.1f}"
        diff_ci = "–" if r is full else f"{100 * lo:+.1f} to {100 * hi:+.1f}"
        lines.append(f"| {r['model']} | {100 * r['accuracy']:.1f}% | {100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}% "
                     f"| {diff} | {diff_ci} | {r['train']['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
