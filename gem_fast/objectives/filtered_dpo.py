"""Cognitive Filtering + DPO, the paper's ablation row: DPO on pairs the model ranked itself.

Before training, the initial model samples each training row's group once (k candidates, plus the
human pair where ``anchor_weight`` > 0, exactly as SEGA builds its groups), ranks it as SEGA does, drops
the ``trim`` lowest and takes the best and the worst member left as (chosen, rejected)
(:func:`gem_fast.ranking.top_bottom_pairs`). Those pairs, one per row and kept in
``<out_dir>/filtered_pairs.jsonl``, then train with DPO against the same initial weights as the
reference, like :class:`~gem_fast.objectives.pairs.PairObjective` on human pairs (β: ``dpo_beta``).
The pairs go through text (decoded, then tokenised as DPO tokenises any pair, EOS appended).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch

from gem_fast.config import TrainConfig
from gem_fast.data import PreferencePair
from gem_fast.distributed import DistEnv
from gem_fast.objectives.pairs import PairObjective, preference_loss
from gem_fast.objectives.sega import SEGA, Row, row_prompt
from gem_fast.policy import PolicyLoss
from gem_fast.ranking import top_bottom_pairs

__all__ = ["FilteredDPO", "filtered_pairs", "top_bottom_members"]

logger = logging.getLogger(__name__)


def filtered_pairs(filter_: SEGA, policy: PolicyLoss, rows: list[Row]) -> list[PreferencePair]:
    """One (top, bottom) pair per row, in row order, from groups sampled and ranked by ``filter_`` (its
    config's sampling, Eq. 1, ranking, anchoring and trim) with ``policy``'s current weights; every rank
    computes all of them (the same seed, so the same pairs, and the same FSDP forwards)."""
    run = filter_.cfg.run
    generator = filter_.generator(0)
    tokenizer = filter_.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = []
    policy.eval()
    for start in range(0, len(rows), run.batch_size):
        chunk = rows[start : start + run.batch_size]
        _, _, groups = filter_.groups(policy, chunk, generator)
        _, ratings = filter_.rate_groups(groups)
        texts = tokenizer.batch_decode(groups.sequences.masked_fill(~groups.mask, pad).tolist(),
                                       skip_special_tokens=True)
        pairs += [PreferencePair(row_prompt(row), texts[best], texts[worst])
                  for row, (best, worst) in zip(chunk, top_bottom_members(ratings, groups.sizes,
                                                                          filter_.cfg.sega.trim))]
    policy.train()
    return pairs


def top_bottom_members(ratings: torch.Tensor, sizes: torch.Tensor, trim: int) -> list[tuple[int, int]]:
    """Per group, the member rows (into ``ratings`` [N], groups of ``sizes`` [B] members in order) of its
    best-rated member and of its worst once the ``trim`` lowest are dropped."""
    members, first = [], 0
    for size in sizes.tolist():
        best, worst = top_bottom_pairs(ratings[first : first + size], 1, trim=trim)[0].tolist()
        members.append((first + best, first + worst))
        first += size
    return members


class FilteredDPO(PairObjective):
    """DPO (β ``dpo_beta``) on the top- and bottom-ranked member of each row's group, filtered once before training."""

    read_rows = staticmethod(SEGA.read_rows)

    def __init__(self, cfg: TrainConfig, env: DistEnv, rows: list[Row], tokenizer: Any) -> None:
        super().__init__(cfg, env, rows, tokenizer)
        self.rows = rows

    @property
    def pair_loss(self) -> functools.partial:
        return functools.partial(preference_loss, "dpo", beta=self.cfg.sega.dpo_beta,
                                 length_normalize=self.cfg.pair.length_normalize)

    def prepare(self, policy: PolicyLoss, out_dir: Path) -> None:
        """Filter the rows into pairs with the initial weights (also on resume: the same seed gives the same
        pairs), write them to ``out_dir/filtered_pairs.jsonl`` (rank 0), then score DPO's reference."""
        self.pairs = filtered_pairs(SEGA(self.cfg, self.env, self.rows, self.tokenizer), policy, self.rows)
        if self.env.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "filtered_pairs.jsonl").write_text("".join(
                json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                for p in self.pairs))
            logger.info("filtered %d pairs into %s", len(self.pairs), out_dir / "filtered_pairs.jsonl")
        super().prepare(policy, out_dir)
