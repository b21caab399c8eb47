#!/usr/bin/env python
"""Supervised fine-tuning (GEM stage A) on completions, chat rows or the chosen responses of pairs; DPO/IPO.

    python scripts/train_sft.py --model_name_or_path meta-llama/Meta-Llama-3-8B-Instruct \
        --train_jsonl data/synthetic/pairs.jsonl --out_dir outputs/sft-demo --epochs 1 --lr 1e-5 --batch_size 1
    torchrun --nproc_per_node 8 scripts/train_sft.py --config configs/sft_demo.yaml --lr 2e-5
    accelerate launch --num_processes 8 scripts/train_sft.py --config configs/sft_demo.yaml  # same as torchrun

Every field of :class:`gem_fast.config.TrainConfig` is a flag (``--help`` lists them by section,
with the transformers names ``--learning_rate``, ``--output_dir``, ... as aliases); ``--config``
reads a YAML file first and flags override it. Writes checkpoints under ``<out_dir>/checkpoints`` (``--resume``
continues from the latest), ``<out_dir>/metrics.jsonl`` and, at the end, a Hugging Face folder
in ``<out_dir>/final`` (``--export_dtype``). Stopped by SIGTERM/SIGINT it checkpoints and exits with 128 + the signal.
"""

from __future__ import annotations

import sys

from gem_fast.cli import train_sft

if __name__ == "__main__":
    sys.exit(train_sft())
