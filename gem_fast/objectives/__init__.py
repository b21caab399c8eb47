"""Training objectives behind one interface (:class:`Objective`): SFT, SEGA, DPO and IPO, and DPO on
self-ranked pairs (``sega.filtered_dpo``: :class:`FilteredDPO`).

The loop asks an objective for each optimizer step's micro-batches and gives its ``pair_loss``
to :class:`gem_fast.policy.PolicyLoss`; it knows nothing else of them.
"""

from __future__ import annotations

from typing import Any

from gem_fast.config import TrainConfig
from gem_fast.distributed import DistEnv
from gem_fast.objectives.base import Objective, StopRequested, step_rows
from gem_fast.objectives.filtered_dpo import FilteredDPO
from gem_fast.objectives.pairs import PairObjective
from gem_fast.objectives.sega import SEGA
from gem_fast.objectives.sft import SFT

__all__ = ["Objective", "StopRequested", "SFT", "SEGA", "PairObjective", "FilteredDPO", "make_objective", "read_rows",
           "step_rows"]

_BY_NAME: dict[str, type[Objective]] = {"sft": SFT, "sega": SEGA, "dpo": PairObjective, "ipo": PairObjective}


def _objective_type(cfg: TrainConfig) -> type[Objective]:
    return FilteredDPO if cfg.run.objective == "sega" and cfg.sega.filtered_dpo else _BY_NAME[cfg.run.objective]


def read_rows(cfg: TrainConfig) -> list[Any]:
    """The training rows of ``cfg.run.train_jsonl`` as the objective reads them (SFT: completions too)."""
    return _objective_type(cfg).read_rows(cfg.run.train_jsonl)


def make_objective(cfg: TrainConfig, env: DistEnv, pairs: list[Any], tokenizer: Any) -> Objective:
    """The objective ``cfg.run.objective`` names (SEGA with ``filtered_dpo``: :class:`FilteredDPO`), over its
    ``pairs`` (:func:`read_rows`)."""
    return _objective_type(cfg)(cfg, env, pairs, tokenizer)
