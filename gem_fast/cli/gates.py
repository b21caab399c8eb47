"""The gates before SEGA: whether Eq. 1 can guide it on a task, measured on labelled training rows.

    python scripts/gates.py --model_name_or_path outputs/sft/final --train_jsonl data/decision/train.jsonl \
        --limit 16 --chat_template --k 4 --gen_max_new_tokens 96 --final_span marker

Rows are preference pairs; gate 2 needs each to hold an ``answer`` (what a correct response states
after ``Answer:``, as the built-in tasks do) and is skipped otherwise.
Prints the three gates of :mod:`gem_fast.gates` (Eq. 1's preference accuracy beside log π's,
the rank correlation of Eq. 1 with correctness over k sampled candidates per prompt, the share
cut off by the token limit) and writes them as JSON (``--output_json``). The sampling and Eq. 1
flags mean what they mean for ``train_sega.py``.

Calibration mode (``--calibrate``, :mod:`gem_fast.calibration`) instead scores a grid of Eq. 1 settings
on the same labelled rows with ``--folds``-fold cross-validation, prints each setting's pair accuracy
with its interval, and writes the chosen one as a YAML fragment for ``train_sega.py --config``
(``--output_yaml``); it reads no other data file:

    python scripts/gates.py --calibrate --model_name_or_path outputs/sft/final \
        --train_jsonl data/decision/train.jsonl --limit 16 --chat_template --output_yaml eq1.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Light modules only: --help and usage errors come before torch and transformers load (in main).
from gem_fast.choices import BACKENDS, DTYPES
from gem_fast.config import SamplingConfig, SegaConfig
from gem_fast.errors import (BOOL_ARG, ArgumentParser, UsageError, add_debug_flag, entry_point, number,
                             training_data, user_input, writable_file)
from gem_fast.run_dir import model_source

if TYPE_CHECKING:
    import torch

    from gem_fast.data import PreferencePair


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="HF folder, .gguf file or Hub id (default: embedded "
                                                              "SmolLM2)")
    p.add_argument("--train_jsonl", required=True, help='JSONL of {"prompt", "chosen", "rejected", "answer"}')
    p.add_argument("--limit", type=number(int, at_least=1), default=None, help="the first N rows only")
    p.add_argument("--chat_template", **BOOL_ARG, default=False, help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--max_length", type=number(int, at_least=2), default=512, help="tokens per prompt+response row")
    p.add_argument("--k", type=number(int, at_least=2), default=SamplingConfig.k, help="candidates per prompt")
    p.add_argument("--gen_max_new_tokens", type=number(int, at_least=1), default=SamplingConfig.gen_max_new_tokens,
                   help="tokens per candidate at most")
    p.add_argument("--temperature", type=number(float, at_least=0), default=SamplingConfig.temperature)
    p.add_argument("--top_p", type=number(float, above=0), default=SamplingConfig.top_p)
    for name in ("final_span", "lambda_fork", "top_m", "final_fraction", "final_weight"):
        default = getattr(SegaConfig, name)
        hint = typing.get_type_hints(SegaConfig)[name]
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        p.add_argument(f"--{name}", type=type(default), default=default, choices=choices, help="as train_sega.py's")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--kernel_backend", default="auto", choices=BACKENDS)
    p.add_argument("--output_json", default=None, help="where the gates (or the calibration) go as JSON "
                                                       "(default: not written)")
    p.add_argument("--calibrate", **BOOL_ARG, default=False, help="score a grid of Eq. 1 settings on the labelled "
                                                                  "rows with k-fold cross-validation instead of the gates")
    p.add_argument("--folds", type=number(int, at_least=2), default=4, help="--calibrate: cross-validation folds")
    p.add_argument("--ranking", choices=("score", "bradley_terry"), default=None,
                   help="--calibrate: only this ranking in the grid (bradley_terry for anchored groups, which need a "
                        "fitted ranking; default: both)")
    p.add_argument("--output_yaml", default=None, help="--calibrate: where the chosen settings go, a YAML fragment "
                                                       "for train_sega.py --config (default: not written)")
    p.add_argument("--overwrite", **BOOL_ARG, default=False, help="replace an existing --output_json / --output_yaml")
    add_debug_flag(p)
    return p.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The sections check their bounds (--top_m 5: one line) before anything loads.
    sampling = SamplingConfig(k=args.k, gen_max_new_tokens=args.gen_max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p)
    sega = SegaConfig(final_span=args.final_span, lambda_fork=args.lambda_fork, top_m=args.top_m,
                      final_fraction=args.final_fraction, final_weight=args.final_weight)
    args.model_name_or_path = model_source(args.model_name_or_path)
    train_jsonl = training_data(args.train_jsonl, "--train_jsonl")
    # torch and transformers only now that the arguments are known to be good
    import torch

    from gem_fast.data import load_preference_jsonl
    from gem_fast.gates import candidate_gates
    from gem_fast.models import load_model_and_tokenizer

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with user_input():
        pairs = load_preference_jsonl(train_jsonl, limit=args.limit)
    if not pairs:
        raise UsageError(f"--train_jsonl {args.train_jsonl}: no rows")
    out = args.output_json and writable_file(args.output_json, "--output_json", overwrite=args.overwrite)
    if args.calibrate and args.folds > len(pairs):
        raise UsageError(f"--folds {args.folds}: more folds than the {len(pairs)} labelled rows")
    out_yaml = args.output_yaml and writable_file(args.output_yaml, "--output_yaml", overwrite=args.overwrite)
    if out_yaml and not args.calibrate:
        raise UsageError("--output_yaml is written by --calibrate only")
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, dtype=getattr(torch, args.dtype),
                                                device=args.device)
    if args.calibrate:
        return _calibrate(args, model.eval(), tokenizer, pairs, out, out_yaml)
    with torch.no_grad():
        gates = candidate_gates(model.eval(), tokenizer, pairs, sampling, sega,
                                chat_template=args.chat_template, max_length=args.max_length, seed=args.seed,
                                backend=args.kernel_backend)
    print("\n".join(gates.lines()))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**vars(args), **gates.to_dict()}, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def _calibrate(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any, pairs: list[PreferencePair],
               out: Path | None, out_yaml: Path | None) -> int:
    import torch

    from gem_fast.calibration import calibrate, default_grid, pair_entropies, setting_correct

    grid = [g for g in default_grid() if args.ranking in (None, g.ranking)]
    tokens = pair_entropies(model, tokenizer, pairs, chat_template=args.chat_template, max_length=args.max_length,
                            backend=args.kernel_backend)
    correct = torch.stack([setting_correct(tokens, setting, tokenizer) for setting in grid])
    result = calibrate(correct, grid, folds=args.folds, seed=args.seed)
    print("\n".join(result.lines()))
    for path, text in ((out_yaml, result.yaml(args.train_jsonl)), (out, json.dumps({
            **vars(args), "pairs": result.pairs, "folds": result.folds, "cv_accuracy": result.cv_accuracy,
            "cv_ci": [result.cv_low, result.cv_high], "beats_chance": result.beats_chance,
            "chosen": dataclasses.asdict(result.chosen),
            "settings": [{**dataclasses.asdict(r.setting), "accuracy": r.accuracy, "ci": [r.ci_low, r.ci_high]}
                         for r in result.results]}, indent=2) + "\n")):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
