"""Eq. 1 calibrated on the labelled pairs: a small grid of settings, scored with k-fold cross-validation.

GEM's stage B trusts Eq. 1 (and the ranking over its token comparisons) to order a group; gate 1
(:mod:`gem_fast.gates`) measures how often it prefers the human-chosen response at one fixed
setting. :func:`calibrate` scores a grid of settings (``lambda_fork`` including 0, ``top_m``,
``final_span`` and ``final_fraction``, the ranking) on the same labelled pairs, teacher-forced
once: a pair counts as right when the setting rates the chosen response strictly above the
rejected one. On two responses Bradley-Terry and TrueSkill both order by the token-level
comparison ``wins[c, r] > wins[r, c]``, so the ranking axis is "score" (Eq. 1's number) against
"bradley_terry" (its token comparisons; TrueSkill would order every pair the same way).

Choosing the best of many settings on n pairs overstates its accuracy, so the estimate that
counts is cross-validated: each fold's pairs are judged by the setting that is best on the other
folds (ties: the earlier setting of the grid, whose first entry is the default), and the
out-of-fold accuracy gets a bootstrap interval. Eq. 1 "beats chance" when that interval's lower
end is above 50 %. The setting returned for training is the best on all labelled pairs. Nothing
here reads held-out data: the only rows are the ones passed in.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gem_fast.config import SegaConfig
from gem_fast.data import PreferencePair, encode_pairs
from gem_fast.eval import bootstrap_ci
from gem_fast.logprobs import response_logprob_entropy
from gem_fast.ranking import entropy_wins
from gem_fast.scoring import answer_span, entropy_score, top_m_mask

__all__ = ["Setting", "SettingResult", "Calibration", "default_grid", "pair_entropies", "setting_correct",
           "calibrate", "NO_SIGNAL"]

NO_SIGNAL = "Eq. 1 carries no signal on this data"


@dataclass(frozen=True)
class Setting:
    """One point of the grid: the SEGA fields it sets (flat names, as ``train_sega.py --config`` reads them)."""

    lambda_fork: float
    top_m: float
    final_span: str
    final_fraction: float
    ranking: str

    def sega(self) -> SegaConfig:
        """The SEGA section with these fields (others at their defaults)."""
        return SegaConfig(**dataclasses.asdict(self))

    def label(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(self).items())


def default_grid() -> list[Setting]:
    """The grid the gates' calibration mode scores: SEGA's defaults (marker span) first, then lambda_fork
    0 / 0.2 / 0.4 / 1 x top_m 0.05 / 0.1 / 0.25 (one top_m where lambda_fork is 0, as it then has no
    effect) x final_span marker / last_fraction x final_fraction 0.1 / 0.25 / 0.5 x ranking score /
    bradley_terry: 120 settings."""
    grid = []
    for lam, top_m, span, fraction, ranking in itertools.product(
            (0.4, 0.0, 0.2, 1.0), (0.1, 0.05, 0.25), ("marker", "last_fraction"), (0.25, 0.1, 0.5),
            ("score", "bradley_terry")):
        if lam == 0 and top_m != 0.1:
            continue
        grid.append(Setting(lam, top_m, span, fraction, ranking))
    return grid


@dataclass(frozen=True)
class PairTokens:
    """Teacher-forced response tokens of n pairs on the predicted-token grid: ``ids``, ``entropy`` (nats,
    float32) and ``valid`` (response tokens), each [n, 2, T], response 0 the chosen, 1 the rejected."""

    ids: torch.Tensor
    entropy: torch.Tensor
    valid: torch.Tensor


@torch.no_grad()
def pair_entropies(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[PreferencePair], *, chat_template: bool,
                   max_length: int = 1024, batch_size: int = 8, backend: str = "auto") -> list[PairTokens]:
    """One teacher-forced forward per batch of ``batch_size`` pairs; the batches' tokens (widths differ)."""
    device = next(model.parameters()).device
    batches = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = encode_pairs(tokenizer, chunk, max_length=max_length, chat_template=chat_template).to(device)
        _, entropy = response_logprob_entropy(model, batch, backend=backend)
        n = len(chunk)  # rows: the chunk's chosen responses, then its rejected ones

        def by_pair(t: torch.Tensor) -> torch.Tensor:
            return t.view(2, n, -1).transpose(0, 1).cpu()

        batches.append(PairTokens(by_pair(batch.input_ids[:, 1:]), by_pair(entropy.float()),
                                  by_pair(batch.response_mask[:, 1:])))
    return batches


def setting_correct(tokens: list[PairTokens], setting: Setting, tokenizer: Any) -> torch.Tensor:
    """[n] bool: pairs whose chosen response ``setting`` rates strictly above the rejected one."""
    sega = setting.sega()
    correct = []
    for t in tokens:
        final = answer_span(sega, t.ids, t.valid, tokenizer) & t.valid
        if setting.ranking == "score":
            scores = entropy_score(t.entropy, final, t.valid, lambda_fork=sega.lambda_fork, top_m=sega.top_m)
            correct.append(scores[:, 0] > scores[:, 1])
        else:
            fork = top_m_mask(t.entropy, t.valid & ~final, sega.top_m)
            wins = entropy_wins(t.entropy, final, fork, lambda_fork=sega.lambda_fork)
            correct.append(wins[:, 0, 1] > wins[:, 1, 0])
    return torch.cat(correct)


@dataclass(frozen=True)
class SettingResult:
    """A setting's pair accuracy on all labelled pairs and its bootstrap 95 % interval."""

    setting: Setting
    accuracy: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Calibration:
    """Every setting's accuracy, the cross-validated accuracy of choosing one (its interval), the chosen one."""

    results: list[SettingResult]
    folds: int
    pairs: int
    cv_accuracy: float
    cv_low: float
    cv_high: float
    chosen: Setting

    @property
    def beats_chance(self) -> bool:
        return self.cv_low > 0.5

    def lines(self) -> list[str]:
        """What the gates' calibration mode prints: every setting (best first), the estimate, the verdict."""
        ranked = sorted(self.results, key=lambda r: -r.accuracy)
        lines = [f"{r.setting.label()}: {100 * r.accuracy:.1f}% (95% CI {100 * r.ci_low:.1f}-{100 * r.ci_high:.1f}%)"
                 for r in ranked]
        lines.append(f"cross-validated ({self.folds} folds of {self.pairs} labelled pairs, each fold judged by the "
                     f"setting best on the others): {100 * self.cv_accuracy:.1f}% (95% CI {100 * self.cv_low:.1f}-"
                     f"{100 * self.cv_high:.1f}%)")
        lines.append(f"chosen (best on all labelled pairs): {self.chosen.label()}")
        if not self.beats_chance:
            lines.append(f"{NO_SIGNAL}: no setting's cross-validated pair accuracy beats chance")
        return lines

    def yaml(self, source: str) -> str:
        """The chosen setting as a YAML fragment for ``train_sega.py --config`` (flat keys), with the evidence."""
        head = [f"# Eq. 1 calibrated on {self.pairs} labelled pairs of {source} ({self.folds}-fold cross-validation):",
                f"# cross-validated pair accuracy {100 * self.cv_accuracy:.1f}% (95% CI {100 * self.cv_low:.1f}-"
                f"{100 * self.cv_high:.1f}%)"]
        if not self.beats_chance:
            head.append(f"# {NO_SIGNAL}")
        body = [f"{k}: {v}" for k, v in dataclasses.asdict(self.chosen).items()]
        return "\n".join(head + body) + "\n"


def calibrate(correct: torch.Tensor, grid: Sequence[Setting], *, folds: int = 4, seed: int = 0) -> Calibration:
    """Cross-validated choice over ``grid`` from ``correct`` [settings, n] bool (:func:`setting_correct` of each).

    Pairs go to ``folds`` folds by a permutation seeded with ``seed``; ``folds`` must be in [2, n].
    """
    n_settings, n = correct.shape
    if n_settings != len(grid) or n_settings == 0:
        raise ValueError(f"correct has {n_settings} rows for a grid of {len(grid)} settings")
    if not 2 <= folds <= n:
        raise ValueError(f"folds must be in [2, {n}] for {n} pairs, got {folds}")
    hits = correct.double()
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[torch.randperm(n, generator=torch.Generator().manual_seed(seed))] = torch.arange(n) % folds
    out_of_fold = torch.empty(n, dtype=torch.float64)
    for f in range(folds):
        held = fold_of == f
        best = int(hits[:, ~held].mean(-1).argmax())  # argmax returns the first of ties
        out_of_fold[held] = hits[best, held]
    results = []
    for setting, row in zip(grid, hits):
        low, high = bootstrap_ci(row)
        results.append(SettingResult(setting, float(row.mean()), low, high))
    cv_low, cv_high = bootstrap_ci(out_of_fold)
    return Calibration(results, folds, n, float(out_of_fold.mean()), cv_low, cv_high,
                       grid[int(hits.mean(-1).argmax())])
