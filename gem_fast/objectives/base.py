"""What every objective shares: the interface the loop drives, and the seeded row schedule."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from gem_fast.config import RunConfig, TrainConfig
from gem_fast.data import PreferencePair, load_preference_jsonl
from gem_fast.distributed import DistEnv
from gem_fast.policy import PairLoss, PolicyLoss, StepBatches

__all__ = ["Objective", "StopRequested", "step_rows"]


def step_rows(step: int, micro: int, n_rows: int, run: RunConfig, env: DistEnv) -> list[int]:
    """Indices of this rank's ``run.batch_size`` rows in micro-step ``micro`` of optimizer step ``step``:
    consecutive slices of a permutation seeded by (seed, epoch), so every rank and a resumed run agree."""
    global_batch = run.batch_size * run.grad_accum * env.world
    steps_per_epoch = n_rows // global_batch
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(run.seed + epoch))
    start = within * global_batch + (micro * env.world + env.rank) * run.batch_size
    return order[start : start + run.batch_size].tolist()


class StopRequested(Exception):
    """Raised by :meth:`Objective.step_batches` between micro-steps once :attr:`Objective.stop_requested`
    says so: nothing of the step was applied, and the loop checkpoints the state before it."""


class Objective(abc.ABC):
    """A training objective over the run's preference pairs: each optimizer step's micro-batches, and
    (DPO/IPO) the loss :class:`~gem_fast.policy.PolicyLoss` applies to pairs; the loop knows no more."""

    pair_loss: PairLoss | None = None  # given to PolicyLoss; None: weighted token log-likelihood
    # Set by the loop: whether the run was told to stop (the same answer on every rank). An objective
    # whose micro-steps take long (SEGA samples in each) asks between them and raises StopRequested.
    stop_requested: Callable[[], bool] = staticmethod(lambda: False)

    def __init__(self, cfg: TrainConfig, env: DistEnv, pairs: list[PreferencePair], tokenizer: Any) -> None:
        self.cfg, self.env, self.pairs, self.tokenizer = cfg, env, pairs, tokenizer

    @property
    def progress(self) -> bool:
        """Whether this rank shows progress bars (rank 0 with ``--progress``)."""
        return self.env.rank == 0 and self.cfg.run.progress

    def micro_steps(self, step: int, doing: str) -> Iterator[int]:
        """The micro-step indices of optimizer step ``step``; between two, :class:`StopRequested` once
        :attr:`stop_requested` says so. With :attr:`progress`, a bar ``doing`` over them on a terminal
        once the step has lasted 5 s (a SEGA step on the CPU takes minutes)."""
        grad_accum = self.cfg.run.grad_accum
        with tqdm(total=grad_accum, desc=f"step {step + 1}: {doing}", unit="micro-step", delay=5, leave=False,
                  disable=None if self.progress else True) as bar:  # None: on a terminal only
            for micro in range(grad_accum):
                if micro > 0 and self.stop_requested():
                    raise StopRequested
                yield micro
                bar.update(1)

    @staticmethod
    def read_rows(path: str) -> list[PreferencePair]:
        """The training rows of ``path`` (here preference pairs); ``ValueError`` with file:line on a bad row."""
        return load_preference_jsonl(path)

    def prepare(self, policy: PolicyLoss, out_dir: Path) -> None:
        """Runs once with the initial weights, before a checkpoint loads (DPO/IPO score their reference)."""

    @abc.abstractmethod
    def step_batches(self, policy: PolicyLoss, step: int) -> StepBatches:
        """This rank's micro-batches of optimizer step ``step`` (0-based) and its step statistics."""

    def micro_pairs(self, step: int, micro: int) -> list[PreferencePair]:
        """This rank's pairs of micro-step ``micro`` of ``step`` (see :func:`step_rows`)."""
        return [self.pairs[i] for i in step_rows(step, micro, len(self.pairs), self.cfg.run, self.env)]
