#!/usr/bin/env python
"""SEGA training (GEM stage B): k sampled chains per prompt, entropy-guided scores, group advantages.

    python scripts/train_sega.py --model_name_or_path outputs/sft-demo \
        --train_jsonl data/synthetic/pairs.jsonl --out_dir outputs/sega-demo \
        --k 4 --lambda_fork 0.4 --top_m 0.1 --reward_mapping softmax --beta 1.0 \
        --gen_max_new_tokens 256 --temperature 1.0 --top_p 0.95 --epochs 1 --lr 5e-6 --batch_size 1
    torchrun --nproc_per_node 8 scripts/train_sega.py --config configs/sega_demo.yaml
    accelerate launch --num_processes 8 scripts/train_sega.py --config configs/sega_demo.yaml  # same as torchrun

Each step samples ``--k`` candidates per prompt (prompt KV cache shared), scores them with
Eq. 1 (``--lambda_fork``, ``--top_m``; the answer span from ``--final_span``), maps scores to
rewards (``--reward_mapping``; ``--beta`` is the softmax temperature) and trains on
``-Σ A_i log π(a_i|q)`` (Eq. 2). Reward, advantage and entropy statistics go to
``<out_dir>/metrics.jsonl``. A training run's folder as ``--model_name_or_path`` means its ``final/``.
Flags, YAML, checkpoints and exit codes as ``train_sft.py``.
"""

from __future__ import annotations

import sys

from gem_fast.cli import train_sega

if __name__ == "__main__":
    sys.exit(train_sega())
