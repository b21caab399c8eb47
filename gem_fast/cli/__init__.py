"""Command-line entry points: the console scripts of pyproject.toml and the files in scripts/.

``gem-fast-sft`` / ``gem-fast-sega`` train (:func:`gem_fast.train.main`), ``gem-fast-eval`` measures
preference accuracy, ``gem-fast-prepare`` writes train/test splits of a dataset,
``gem-fast-plan-memory`` and ``gem-fast-plan-kernel`` predict memory before renting GPUs.
"""

from __future__ import annotations

import sys

SFT_DESCRIPTION = ("Supervised fine-tuning (GEM stage A) on {prompt, completion} rows, chat {messages} rows or the "
                   "chosen responses of preference pairs; --objective dpo|ipo trains on the pairs.")
SEGA_DESCRIPTION = ("SEGA training (GEM stage B): k sampled chains per prompt, entropy-guided scores, "
                    "group advantages.")


def train_sft() -> int:
    from gem_fast.train import main

    return main(sys.argv[1:], objective="sft", description=SFT_DESCRIPTION)


def train_sega() -> int:
    from gem_fast.train import main

    return main(sys.argv[1:], objective="sega", description=SEGA_DESCRIPTION)
