"""Command-line entry points: the console scripts of pyproject.toml and the files in scripts/.

``gem-fast-sft`` / ``gem-fast-sega`` train (:func:`main`), ``gem-fast-eval`` measures
preference accuracy, ``gem-fast-prepare`` writes train/test splits of a dataset,
``gem-fast-plan-memory`` and ``gem-fast-plan-kernel`` predict memory before renting GPUs.
"""

from __future__ import annotations

import logging
import os
import sys

from gem_fast.errors import entry_point
from gem_fast.flags import parse_config
from gem_fast.run_dir import checked_paths

SFT_DESCRIPTION = ("Supervised fine-tuning (GEM stage A) on {prompt, completion} rows, chat {messages} rows or the "
                   "chosen responses of preference pairs; --objective dpo|ipo trains on the pairs.")
SEGA_DESCRIPTION = ("SEGA training (GEM stage B): k sampled chains per prompt, entropy-guided scores, "
                    "group advantages.")


@entry_point
def main(argv: list[str] | None, *, objective: str, description: str) -> int:
    """Entry point of ``scripts/train_*.py``: the arguments are parsed (``--help``, usage errors) and the
    paths checked before torch and transformers load, then :func:`gem_fast.train.run` trains. Exit codes
    as ``run``'s; 2 with one line for a user error, 130 for a second Ctrl-C (:mod:`gem_fast.errors`)."""
    cfg = parse_config(argv, objective=objective, description=description)
    # Under torchrun only rank 0 narrates; the others report warnings and errors.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = checked_paths(cfg)
    from gem_fast.train import run  # torch, transformers: only once the arguments are known to be good

    return run(cfg)


def train_sft() -> int:
    return main(sys.argv[1:], objective="sft", description=SFT_DESCRIPTION)


def train_sega() -> int:
    return main(sys.argv[1:], objective="sega", description=SEGA_DESCRIPTION)
