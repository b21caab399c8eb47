"""Preference accuracy with the implicit reward r(q, a) = β·log π(a|q).

With a reference model the reward is β·(log π − log π_ref) (DPO's implicit reward);
``length_normalize`` uses the per-token mean log-prob instead of the sum. Accuracy comes
with a percentile bootstrap interval (seeded, 1000 resamples by default), overall and per
subset.

A pair counts as correct when r(chosen) > r(rejected); a tie is not correct (a model that
cannot tell the two apart has not predicted the preference). Two rewards tie when they
differ by at most ``tie_tolerance`` (relative, 1e-6 by default) of the larger magnitude
(at least 1): float32 sums of equal per-token values differ in the last bits, and that
noise is no preference; ``tie_tolerance=0`` compares exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from gem_fast.data import PreferencePair, TokenizerLike
from gem_fast.logprobs import PairLogprobs, pair_logprobs

__all__ = [
    "AccuracyStats",
    "PreferenceAccuracy",
    "implicit_rewards",
    "bootstrap_ci",
    "paired_bootstrap_ci",
    "accuracy_stats",
    "accuracy_report",
    "evaluate_preference_accuracy",
    "format_table",
]


@dataclass(frozen=True)
class AccuracyStats:
    """Accuracy in [0, 1] of ``n`` pairs, its bootstrap interval, and how many pairs tied."""

    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    ties: int


@dataclass(frozen=True)
class PreferenceAccuracy:
    """Overall and per-subset accuracy, the settings that produced them, and per-pair margins."""

    overall: AccuracyStats
    per_subset: dict[str, AccuracyStats]
    beta: float
    length_normalize: bool
    with_reference: bool
    tie_tolerance: float
    confidence: float
    margins: list[float] = field(repr=False)
    correct: list[bool] = field(repr=False)  # per pair, in input order: what the accuracy averages

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return asdict(self)


def implicit_rewards(
    policy: PairLogprobs,
    reference: PairLogprobs | None = None,
    *,
    beta: float = 1.0,
    length_normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_chosen, r_rejected)`` [n]: β·log π, or β·(log π − log π_ref) with a reference."""
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    chosen, rejected = policy.values(length_normalize=length_normalize)
    if reference is not None:
        if reference.chosen.shape != policy.chosen.shape:
            raise ValueError("reference must hold log-probs of the same pairs as policy")
        ref_chosen, ref_rejected = reference.values(length_normalize=length_normalize)
        chosen, rejected = chosen - ref_chosen, rejected - ref_rejected
    return beta * chosen, beta * rejected


def bootstrap_ci(
    correct: torch.Tensor,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``correct`` ([n] bool or float), seeded."""
    if not isinstance(correct, torch.Tensor) or correct.dim() != 1 or correct.numel() == 0:
        raise ValueError("correct must be a non-empty 1-D tensor")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    generator = torch.Generator().manual_seed(seed)
    values = correct.detach().cpu().double()
    index = torch.randint(0, values.numel(), (n_resamples, values.numel()), generator=generator)
    means = values[index].mean(-1)
    tail = (1 - confidence) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(lo), float(hi)


def _ties_and_correct(r_chosen: torch.Tensor, r_rejected: torch.Tensor, tie_tolerance: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [n] bool: rewards within ``tie_tolerance`` of the larger magnitude (at least 1) of each other,
    and pairs whose chosen reward is higher without a tie."""
    scale = torch.maximum(r_chosen.abs(), r_rejected.abs()).clamp(min=1.0)
    tie = (r_chosen - r_rejected).abs() <= tie_tolerance * scale
    return tie, (r_chosen > r_rejected) & ~tie


def paired_bootstrap_ci(
    correct_a: Sequence[bool], correct_b: Sequence[bool], *, n_resamples: int = 1000, confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Accuracy difference A - B on the same n pairs and its paired percentile bootstrap interval (the pairs
    resampled together, so what both get right or wrong cancels): ``(difference, low, high)``."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"the two models were scored on {len(correct_a)} and {len(correct_b)} pairs")
    diff = torch.tensor(correct_a, dtype=torch.float64) - torch.tensor(correct_b, dtype=torch.float64)
    lo, hi = bootstrap_ci(diff, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return float(diff.mean()), lo, hi


def accuracy_stats(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    tie_tolerance: float = 1e-6,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> AccuracyStats:
    """Accuracy of ``r_chosen > r_rejected`` (ties are wrong) with a bootstrap interval."""
    if r_chosen.shape != r_rejected.shape or r_chosen.dim() != 1:
        raise ValueError("r_chosen and r_rejected must be 1-D tensors of the same shape")
    if not tie_tolerance >= 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance!r}")
    tie, correct = _ties_and_correct(r_chosen, r_rejected, tie_tolerance)
    lo, hi = bootstrap_ci(correct, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return AccuracyStats(
        accuracy=float(correct.double().mean()),
        ci_low=lo,
        ci_high=hi,
        n=correct.numel(),
        ties=int(tie.sum()),
    )


def accuracy_report(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    subsets: Sequence[str | None] | None = None,
    *,
    beta: float = 1.0,
    length_normalize: bool = False,
    with_reference: bool = False,
    tie_tolerance: float = 1e-6,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PreferenceAccuracy:
    """Overall accuracy and, for rows whose subset is not None, accuracy per subset."""
    stats = dict(tie_tolerance=tie_tolerance, n_resamples=n_resamples, confidence=confidence, seed=seed)
    per_subset: dict[str, AccuracyStats] = {}
    if subsets is not None:
        if len(subsets) != r_chosen.numel():
            raise ValueError(f"subsets has {len(subsets)} entries for {r_chosen.numel()} pairs")
        for name in sorted({s for s in subsets if s is not None}):
            rows = torch.tensor([s == name for s in subsets])
            per_subset[name] = accuracy_stats(r_chosen[rows], r_rejected[rows], **stats)
    return PreferenceAccuracy(
        overall=accuracy_stats(r_chosen, r_rejected, **stats),
        per_subset=per_subset,
        beta=beta,
        length_normalize=length_normalize,
        with_reference=with_reference,
        tie_tolerance=tie_tolerance,
        confidence=confidence,
        margins=(r_chosen - r_rejected).tolist(),
        correct=_ties_and_correct(r_chosen, r_rejected, tie_tolerance)[1].tolist(),
    )


def evaluate_preference_accuracy(
    model: torch.nn.Module,
    tokenizer: TokenizerLike,
    pairs: Sequence[PreferencePair],
    *,
    beta: float = 1.0,
    ref_model: torch.nn.Module | None = None,
    length_normalize: bool = False,
    batch_size: int = 8,
    max_length: int = 1024,
    chat_template: bool = False,
    tie_tolerance: float = 1e-6,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    backend: str = "auto",
    progress: bool | None = None,
) -> PreferenceAccuracy:
    """Preference accuracy of ``model`` on ``pairs`` (see the module docstring for the rules).

    ``progress``: a tqdm bar over the pairs per model scored (None: only on a TTY).
    """
    forward = dict(batch_size=batch_size, max_length=max_length, chat_template=chat_template, backend=backend,
                   progress=progress)
    policy = pair_logprobs(model, tokenizer, pairs, desc="eval: model log-probs", **forward)
    reference = (None if ref_model is None else
                 pair_logprobs(ref_model, tokenizer, pairs, desc="eval: reference log-probs", **forward))
    r_chosen, r_rejected = implicit_rewards(policy, reference, beta=beta, length_normalize=length_normalize)
    return accuracy_report(
        r_chosen,
        r_rejected,
        [p.subset for p in pairs],
        beta=beta,
        length_normalize=length_normalize,
        with_reference=ref_model is not None,
        tie_tolerance=tie_tolerance,
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
    )


def format_table(report: PreferenceAccuracy) -> str:
    """A plain-text table: one line per subset and one for all pairs (accuracy in %)."""
    level = f"{round(report.confidence * 100)}% CI"
    header = f"{'subset':<24} {'n':>6} {'accuracy':>9} {level:>17} {'ties':>5}"
    rows = [header, "-" * len(header)]
    for name, s in [*report.per_subset.items(), ("all", report.overall)]:
        interval = f"[{100 * s.ci_low:5.1f}, {100 * s.ci_high:5.1f}]"
        rows.append(f"{name:<24} {s.n:>6} {100 * s.accuracy:>8.1f}% {interval:>17} {s.ties:>5}")
    reward = "beta*(log pi - log pi_ref)" if report.with_reference else "beta*log pi"
    norm = "per-token mean" if report.length_normalize else "summed"
    rows.append(f"implicit reward {reward}, beta={report.beta:g}, log-probs {norm}; ties count as wrong")
    return "\n".join(rows)
