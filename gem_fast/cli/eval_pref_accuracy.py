"""Preference accuracy of a causal LM on a JSONL file of pairs, with the implicit reward β·log π(a|q).

    python scripts/eval_pref_accuracy.py --model_name_or_path outputs/sega-demo \
        --eval_jsonl data/synthetic/pairs.jsonl --beta 1.0

Prints a table (per subset when rows carry "subset", then all pairs) and, with
``--task_max_new_tokens N``, the task accuracy: how often the greedy completion (at most N tokens)
states the row's ``answer`` after ``Answer:``. Writes the report, per-pair margins and correctness
included, as JSON: by default beside the evaluated model, as
``<model folder>/pref_accuracy-<eval file stem>.json`` (``<file>.pref_accuracy-<stem>.json`` for a
.gguf file, ``outputs/pref_accuracy/<model>-<stem>.json`` for a Hub id or the embedded SmolLM2). An
existing report is kept unless --overwrite. Without --model_name_or_path the embedded SmolLM2 runs.
A training run's out_dir as --model_name_or_path means its ``final/``, and prompts then get the chat
template the run trained with unless --chat_template says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# Light modules only: --help and usage errors come before torch and transformers load (in main).
from gem_fast.choices import BACKENDS, DTYPES
from gem_fast.errors import (BOOL_ARG, ArgumentParser, UsageError, add_debug_flag, entry_point, number,
                             training_data, user_input, writable_file)
from gem_fast.run_dir import model_source, trained_chat_template

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model_name_or_path", default=None, help="HF folder, a training run's out_dir (its final/), .gguf file "
                                                   "or Hub id (default: embedded SmolLM2)"
    )
    p.add_argument("--eval_jsonl", required=True, help='JSONL of {"prompt", "chosen", "rejected"[, "subset"]}')
    p.add_argument("--beta", type=number(float, above=0), default=1.0, help="implicit reward scale")
    p.add_argument("--ref_model_name_or_path", default=None, help="reference model: reward β·(log π − log π_ref)")
    p.add_argument("--length_normalize", **BOOL_ARG, default=False, help="per-token mean log-prob instead of the sum")
    p.add_argument("--chat_template", **BOOL_ARG, default=None,
                   help="wrap prompts in the tokenizer's chat template (default: as the run whose final/ is "
                        "evaluated trained, from its train_config.json; else false, as in training)")
    p.add_argument("--batch_size", type=number(int, at_least=1), default=8, help="pairs per forward")
    p.add_argument("--max_length", type=number(int, at_least=2), default=1024, help="tokens per prompt+response row")
    p.add_argument("--limit", type=number(int, at_least=1), default=None, help="evaluate the first N pairs only")
    p.add_argument("--tie_tolerance", type=number(float, at_least=0), default=1e-6, help="relative reward gap that still counts as a tie")
    p.add_argument("--n_bootstrap", type=number(int, at_least=1), default=1000,
                   help="bootstrap resamples for the 95%% interval")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--kernel_backend", "--backend", dest="backend", default="auto", choices=BACKENDS,
                   help="kernel backend (as the training scripts' --kernel_backend)")
    p.add_argument("--task_max_new_tokens", type=number(int, at_least=0), default=0,
                   help="also the greedy task accuracy on rows with an 'answer', completions of at most this many "
                        "tokens (0: off)")
    p.add_argument("--progress", **BOOL_ARG, default=None,
                   help="progress bars while scoring (default: on a terminal only)")
    p.add_argument("--output_json", default=None,
                   help="where the JSON report goes (default: beside the model, see the module doc)")
    p.add_argument("--overwrite", **BOOL_ARG, default=False, help="replace an existing report at --output_json")
    add_debug_flag(p)
    return p.parse_args(argv)


def default_output(model_name_or_path: str | None, eval_jsonl: str | Path) -> Path:
    """Where the report goes without --output_json: beside the evaluated model (see the module doc)."""
    report = f"pref_accuracy-{Path(eval_jsonl).stem}.json"
    if model_name_or_path is not None:
        model = Path(model_name_or_path).expanduser()
        if model.is_dir():
            return model / report
        if model.is_file():
            return model.with_name(f"{model.stem}.{report}")
    name = (model_name_or_path or "embedded-smollm2").replace("/", "--")
    return Path("outputs") / "pref_accuracy" / f"{name}-{Path(eval_jsonl).stem}.json"


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for flag in ("model_name_or_path", "ref_model_name_or_path"):
        setattr(args, flag, model_source(getattr(args, flag), f"--{flag}"))
    if args.chat_template is None:
        args.chat_template = bool(trained_chat_template(args.model_name_or_path))
        logger.info("chat template %s (--chat_template to choose)", "on" if args.chat_template else "off")
    eval_jsonl = training_data(args.eval_jsonl, "--eval_jsonl")
    # torch and transformers only now that the arguments are known to be good
    import torch

    from gem_fast.data import load_preference_jsonl
    from gem_fast.eval import evaluate_preference_accuracy, format_table
    from gem_fast.gates import greedy_task_accuracy
    from gem_fast.models import load_model_and_tokenizer

    with user_input():  # the loader's messages name file and line
        pairs = load_preference_jsonl(eval_jsonl, limit=args.limit)
    if not pairs:
        raise UsageError(f"--eval_jsonl {args.eval_jsonl}: no pairs to evaluate")
    if args.task_max_new_tokens and (missing := sum(p.answer is None for p in pairs)):
        raise UsageError(f"--task_max_new_tokens: {missing} rows of {args.eval_jsonl} have no 'answer' field")
    out = writable_file(args.output_json or default_output(args.model_name_or_path, args.eval_jsonl),
                        "--output_json", overwrite=args.overwrite)
    dtype = getattr(torch, args.dtype)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, dtype=dtype, device=args.device)
    ref_model = None
    if args.ref_model_name_or_path is not None:
        ref_model, _ = load_model_and_tokenizer(args.ref_model_name_or_path, dtype=dtype, device=args.device)
    report = evaluate_preference_accuracy(
        model,
        tokenizer,
        pairs,
        beta=args.beta,
        ref_model=ref_model,
        length_normalize=args.length_normalize,
        batch_size=args.batch_size,
        max_length=args.max_length,
        chat_template=args.chat_template,
        tie_tolerance=args.tie_tolerance,
        n_resamples=args.n_bootstrap,
        seed=args.seed,
        backend=args.backend,
        progress=args.progress,
    )
    print(format_table(report))
    task = {}
    if args.task_max_new_tokens:
        task["task_accuracy"] = greedy_task_accuracy(
            model, tokenizer, [p.prompt for p in pairs], [p.answer for p in pairs],
            max_new_tokens=args.task_max_new_tokens, chat_template=args.chat_template, max_length=args.max_length)
        print(f"task accuracy (greedy, {args.task_max_new_tokens} tokens at most): {100 * task['task_accuracy']:.1f}%")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model_name_or_path": args.model_name_or_path,
        "ref_model_name_or_path": args.ref_model_name_or_path,
        "eval_jsonl": str(args.eval_jsonl),
        **report.to_dict(),
        **task,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
