"""Convert a preference dataset to gem_fast train/test JSONL pairs, split by prompt.

    python scripts/prepare_data.py --input skywork_80k.parquet --format skywork \
        --out_dir data/skywork --test_fraction 0.1 --seed 0

The input is a .jsonl, .json or .parquet file or a folder saved by datasets' save_to_disk;
--format is one of gem_fast.data.formats.FORMATS or auto (detected from the first row). Writes
OUT_DIR/train.jsonl and OUT_DIR/test.jsonl as {"prompt", "chosen", "rejected"[, "subset"]}
with no prompt in both, and prints the counts. Existing train/test files are kept unless --overwrite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gem_fast.data.formats import (
    FORMATS,
    PREFERENCES,
    detect_file_format,
    load_pairs,
    split_pairs,
    write_pairs_jsonl,
)
from gem_fast.errors import (BOOL_ARG, ArgumentParser, UsageError, add_debug_flag, check_model_source, entry_point,
                             output_dir, user_input, writable_file)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help=".jsonl/.json/.parquet file or a save_to_disk folder")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="row layout (auto: detect)")
    p.add_argument("--out_dir", required=True, help="where train.jsonl and test.jsonl go")
    p.add_argument("--test_fraction", type=float, default=0.1, help="share of pairs for test (whole prompts)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt shuffle")
    p.add_argument("--preference", choices=PREFERENCES, help="pku_saferlhf label to follow (default: better)")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict folder")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer folder or Hub id whose chat template renders the prompts"
    )
    p.add_argument("--overwrite", **BOOL_ARG, default=False,
                   help="replace existing train.jsonl / test.jsonl in --out_dir")
    add_debug_flag(p)
    return p.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.input).exists():
        raise UsageError(f"--input {args.input}: no such file or folder")
    out_dir = output_dir(args.out_dir, "--out_dir")
    outputs = {name: writable_file(out_dir / f"{name}.jsonl", "--out_dir", overwrite=args.overwrite)
               for name in ("train", "test")}
    check_model_source(args.tokenizer, "--tokenizer")
    tokenizer = None
    if args.tokenizer is not None:
        from transformers import AutoTokenizer  # heavy import, only when a template is wanted

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with user_input():  # data problems: the message names file and row
        fmt = args.format if args.format != "auto" else detect_file_format(args.input, split=args.split)
        pairs = load_pairs(
            args.input, format=fmt, preference=args.preference, tokenizer=tokenizer, split=args.split
        )
        train, test = split_pairs(pairs, args.test_fraction, args.seed)
    print(f"{args.input}: {len(pairs)} pairs, format {fmt}")
    for name, part in (("train", train), ("test", test)):
        write_pairs_jsonl(part, outputs[name])
        prompts = len({p.prompt for p in part})
        print(f"{name}: {len(part)} pairs, {prompts} prompts -> {out_dir / f'{name}.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
