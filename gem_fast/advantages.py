"""SEGA (Self-Evaluated Group Advantage, GEM Eq. 2): rewards, group advantages, loss weights.

For a group of k candidates a_i of prompt q with scores S_i (Eq. 1, or ranking ratings):

    r_i = f(S_i),   A_i = r_i - mean_j r_j,   L = -sum_i A_i * log π(a_i | q),

with f = identity, softmax(S / temperature) or the z-score (S - mean) / std over the group (the
official code's normalisation), and log π(a|q) the sum of the response tokens' log-probs (prompt
and padding masked). Advantages are constants.

Choices made where the paper is silent:

* Trimming drops the ``trim`` lowest-scoring candidates before the mapping: the softmax and
  the mean run over the kept ones only, and the trimmed get A = 0.
* A ``-inf`` score (no final answer, see :mod:`gem_fast.scoring`) gets reward 0 under
  softmax; under identity and z-score it takes the lowest finite score of its group.
* z-score: the sample standard deviation (Bessel-corrected, as ``torch.std`` in the official
  code) of the group's kept candidates; a group whose spread is below 1e-6 is only centred,
  as there. A group without
  any finite score gets A = 0 everywhere (nothing to compare).
* Normalisation of the loss: the sum over all candidates' tokens is divided by the number of
  groups B of the global batch (Eq. 2 literally, averaged over prompts; long responses weigh
  more). :func:`sega_token_weights` turns advantages into the per-token weights
  :class:`gem_fast.policy.PolicyLoss` trains on; :mod:`gem_fast.objectives.sega` runs the
  whole step (sample, score, rank, advantages).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from gem_fast.ranking import trim_mask

__all__ = ["MAPPINGS", "map_rewards", "sega_advantages", "sega_token_weights"]

MAPPINGS = ("identity", "softmax", "zscore")
Mapping = Literal["identity", "softmax", "zscore"]
_MIN_STD = 1e-6  # the official code divides by the std only above this


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or not scores.dtype.is_floating_point:
        raise ValueError("scores must be a floating-point torch.Tensor [..., k]")
    if scores.dim() < 1 or scores.shape[-1] < 1:
        raise ValueError(f"scores must have shape [..., k] with k >= 1, got {tuple(scores.shape)}")


def map_rewards(
    scores: torch.Tensor,
    *,
    mapping: Mapping = "softmax",
    temperature: float = 1.0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rewards r = f(S) [..., k] float32 over the ``keep``-marked candidates of each group.

    identity: r = S, with ``-inf`` raised to the group's lowest finite kept score; softmax:
    r = softmax(S / temperature) over the kept candidates (``-inf`` gives 0); zscore: the identity
    rewards minus their kept mean, over their kept standard deviation when that is >= 1e-6
    (``temperature`` unused). Candidates not kept get r = 0; a group with no finite kept score
    gets r = 0.
    """
    _check_scores(scores)
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    s = scores.float()
    keep = torch.ones_like(s, dtype=torch.bool) if keep is None else keep.bool()
    if keep.shape != s.shape:
        raise ValueError(f"keep has shape {tuple(keep.shape)}, expected {tuple(s.shape)}")
    finite = torch.isfinite(s) & keep
    scored = finite.any(-1, keepdim=True)
    if mapping in ("identity", "zscore"):
        lowest = s.masked_fill(~finite, float("inf")).amin(-1, keepdim=True)
        r = torch.where(s == float("-inf"), lowest, s)
        if mapping == "zscore":
            r = _zscore(r.masked_fill(~keep, 0.0), keep)
    else:
        r = torch.softmax((s / temperature).masked_fill(~keep, float("-inf")), dim=-1)
    return torch.where(keep & scored, r, 0.0)


def _zscore(r: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(r - mean) / std over the ``keep`` entries of each group; only centred where std < 1e-6 or undefined."""
    kept = keep.float()
    n = kept.sum(-1, keepdim=True)
    centred = (r - (r * kept).sum(-1, keepdim=True) / n.clamp(min=1)) * kept
    std = ((centred**2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    return torch.where((n > 1) & (std >= _MIN_STD), centred / std, centred)


def sega_advantages(
    scores: torch.Tensor,
    *,
    mapping: Mapping = "softmax",
    temperature: float = 1.0,
    trim: int = 0,
) -> torch.Tensor:
    """Group-mean advantages A = r - mean(r) [..., k] float32 (zero mean over kept candidates).

    ``scores`` [..., k] (Eq. 1 scores or ranking ratings, higher is better); the ``trim``
    lowest of each group are dropped and get A = 0. See :func:`map_rewards` for r.
    """
    _check_scores(scores)
    keep = trim_mask(scores, trim)
    r = map_rewards(scores, mapping=mapping, temperature=temperature, keep=keep)
    kept = keep.float()
    baseline = (r * kept).sum(-1, keepdim=True) / kept.sum(-1, keepdim=True)
    scored = (torch.isfinite(scores) & keep).any(-1, keepdim=True)
    return torch.where(keep & scored, r - baseline, 0.0)


def sega_token_weights(advantages: torch.Tensor, groups: float, width: int) -> torch.Tensor:
    """Eq. 2's per-token loss weights [N, width] float32: ``A_i / groups`` on every token of candidate row i.

    ``advantages`` [B, k] or, for groups of different sizes, [N] (constants), rows prompt-major as the
    sampler returns them; ``groups``
    is the number of prompts the loss averages over ("group" normalisation: the sum over all
    candidates' tokens divided by it; long responses weigh more). ``width`` is the row's
    predicted-token count L - 1; padding and prompt tokens are masked by the targets, not here.
    """
    if not isinstance(advantages, torch.Tensor) or advantages.dim() not in (1, 2):
        raise ValueError("advantages must be a torch.Tensor [B, k] or [N]")
    if not groups > 0:
        raise ValueError(f"groups must be > 0, got {groups!r}")
    return (advantages.detach().float().reshape(-1, 1) * (1.0 / groups)).expand(-1, width).contiguous()
