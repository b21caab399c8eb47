"""Ranking the k candidates of each group: by score, Bradley-Terry, or a TrueSkill-style update.

Everything works on ratings ``[..., k]`` (higher is better) or win matrices ``[..., k, k]``
where ``wins[..., i, j]`` is how often candidate i beat candidate j (soft counts allowed; the
diagonal is ignored). Leading dims are groups, usually ``[B]``.

Win matrices come from scores (one comparison per pair) or from token-level comparisons:
``wins_from_tokens`` gives the probability that a random token value of candidate i beats
one of candidate j (Mann-Whitney, ties count half), and ``entropy_wins`` combines the two
Eq. 1 signals that way: lower final-answer entropy wins, higher fork entropy wins,
weighted 1 : lambda_fork. A candidate with no tokens of a kind loses that comparison to
any candidate with some, and ties with another empty one.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from gem_fast.choices import RATING_METHODS  # what candidate_ratings rates by; light, for the CLI

__all__ = [
    "RATING_METHODS",
    "rank_order",
    "wins_from_scores",
    "wins_from_tokens",
    "entropy_wins",
    "anchor_human_pair",
    "bradley_terry",
    "trueskill",
    "candidate_ratings",
    "trim_mask",
    "top_bottom_pairs",
]


def _check_ratings(ratings: torch.Tensor, name: str = "ratings") -> None:
    if not isinstance(ratings, torch.Tensor) or not ratings.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point torch.Tensor [..., k]")
    if ratings.dim() < 1 or ratings.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., k] with k >= 1, got {tuple(ratings.shape)}")


def _check_wins(wins: torch.Tensor) -> None:
    if not isinstance(wins, torch.Tensor) or not wins.dtype.is_floating_point:
        raise ValueError("wins must be a floating-point torch.Tensor [..., k, k]")
    if wins.dim() < 2 or wins.shape[-1] != wins.shape[-2]:
        raise ValueError(f"wins must have shape [..., k, k], got {tuple(wins.shape)}")
    if bool((wins < 0).any()):
        raise ValueError("wins must be non-negative")


def _off_diagonal(wins: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(wins.shape[-1], dtype=torch.bool, device=wins.device)
    return wins.masked_fill(eye, 0.0)


def rank_order(ratings: torch.Tensor) -> torch.Tensor:
    """Candidate indices best-first, [..., k] int64; ties keep index order, ``-inf`` goes last."""
    _check_ratings(ratings)
    return torch.sort(ratings, dim=-1, descending=True, stable=True).indices


def wins_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """[..., k] scores -> [..., k, k] wins: 1 if s_i > s_j, 0.5 on a tie, 0 on the diagonal."""
    _check_ratings(scores, "scores")
    s_i, s_j = scores.unsqueeze(-1), scores.unsqueeze(-2)
    wins = (s_i > s_j).to(scores.dtype) + 0.5 * (s_i == s_j).to(scores.dtype)
    return _off_diagonal(wins)


def wins_from_tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """P(token value of i > token value of j) + P(equal) / 2 for every pair, [..., k, k].

    ``values`` [..., k, T] float (higher is better), ``mask`` [..., k, T] bool: the tokens
    that take part. ``wins[i, j] + wins[j, i] = 1`` off the diagonal; the diagonal is 0.
    Cost O(k^2 T log T) per group through sorting, never a [T, T] table.
    """
    if not isinstance(values, torch.Tensor) or not values.dtype.is_floating_point or values.dim() < 2:
        raise ValueError("values must be a floating-point torch.Tensor [..., k, T]")
    if not isinstance(mask, torch.Tensor) or mask.shape != values.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(values.shape)}")
    k, t = values.shape[-2:]
    lead = values.shape[:-2]
    vals = values.reshape(-1, k, t).masked_fill(~mask.reshape(-1, k, t), 0.0)
    taking_part = mask.reshape(-1, k, t)
    # Padding sorts to the end as +inf, so it is never "less than or equal to" a real value.
    sorted_j = torch.sort(vals.masked_fill(~taking_part, float("inf")), dim=-1).values
    g = vals.shape[0]
    seq = sorted_j.unsqueeze(1).expand(g, k, k, t).contiguous()
    query = vals.unsqueeze(2).expand(g, k, k, t).contiguous()
    below = torch.searchsorted(seq, query, side="left")
    at_or_below = torch.searchsorted(seq, query, side="right")
    count_i = taking_part.sum(-1).to(values.dtype)
    u = ((below + at_or_below).to(values.dtype) * taking_part.unsqueeze(2)).sum(-1) / 2
    pairs = count_i.unsqueeze(-1) * count_i.unsqueeze(-2)
    empty_i, empty_j = (count_i == 0).unsqueeze(-1), (count_i == 0).unsqueeze(-2)
    prob = torch.where(pairs > 0, u / pairs.clamp(min=1), 0.5 * (empty_i & empty_j) + 1.0 * (~empty_i & empty_j))
    return _off_diagonal(prob).reshape(*lead, k, k)


def entropy_wins(
    token_entropy: torch.Tensor,
    final_mask: torch.Tensor,
    fork_mask: torch.Tensor,
    *,
    lambda_fork: float = 0.4,
    final_weight: float = 1.0,
) -> torch.Tensor:
    """Token-level Eq. 1 win matrix [..., k, k] from entropies [..., k, T].

    ``(final_weight * W_final + lambda_fork * W_fork) / (final_weight + lambda_fork)`` with W_final comparing
    final-answer entropies (lower wins) and W_fork comparing fork entropies (higher wins);
    ``fork_mask`` is the top-m set, e.g. from :func:`gem_fast.scoring.top_m_mask`.
    """
    if not (isinstance(lambda_fork, (int, float)) and math.isfinite(lambda_fork) and lambda_fork >= 0):
        raise ValueError(f"lambda_fork must be a finite number >= 0, got {lambda_fork!r}")
    if not (isinstance(final_weight, (int, float)) and math.isfinite(final_weight) and final_weight >= 0
            and final_weight + lambda_fork > 0):
        raise ValueError(f"final_weight must be a finite number >= 0, not 0 with lambda_fork 0, got {final_weight!r}")
    entropy = token_entropy.float()
    w_final = wins_from_tokens(-entropy, final_mask)
    w_fork = wins_from_tokens(entropy, fork_mask)
    return (final_weight * w_final + lambda_fork * w_fork) / (final_weight + lambda_fork)


def anchor_human_pair(
    wins: torch.Tensor,
    chosen_index: torch.Tensor,
    rejected_index: torch.Tensor,
    weight: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Add ``weight`` wins of the human-chosen candidate over the rejected one in each group.

    ``wins`` [B, k, k]; ``chosen_index``/``rejected_index`` [B] int64 positions of the human
    pair among the candidates; ``weight`` a float or [B] (0 for groups without a pair).
    Returns a new matrix.
    """
    _check_wins(wins)
    if wins.dim() != 3:
        raise ValueError(f"wins must have shape [B, k, k], got {tuple(wins.shape)}")
    b, k = wins.shape[0], wins.shape[-1]
    for name, idx in (("chosen_index", chosen_index), ("rejected_index", rejected_index)):
        if not isinstance(idx, torch.Tensor) or idx.shape != (b,) or idx.dtype != torch.long:
            raise ValueError(f"{name} must be an int64 tensor of shape ({b},)")
        if bool(((idx < 0) | (idx >= k)).any()):
            raise ValueError(f"{name} must lie in [0, {k})")
    if bool((chosen_index == rejected_index).any()):
        raise ValueError("chosen_index and rejected_index must differ in every group")
    weight = torch.as_tensor(weight, dtype=wins.dtype, device=wins.device).expand(b)
    if bool((weight < 0).any()):
        raise ValueError("weight must be >= 0")
    out = wins.clone()
    out[torch.arange(b, device=wins.device), chosen_index, rejected_index] += weight
    return out


def _bt_loglik(theta: torch.Tensor, wins: torch.Tensor) -> torch.Tensor:
    diff = theta.unsqueeze(-1) - theta.unsqueeze(-2)
    return (wins * torch.nn.functional.logsigmoid(diff)).sum((-2, -1))


def bradley_terry(
    wins: torch.Tensor,
    *,
    method: Literal["mm", "newton"] = "mm",
    prior: float = 0.1,
    max_iter: int = 500,
    tol: float = 1e-9,
) -> torch.Tensor:
    """Maximum-likelihood Bradley-Terry log-strengths [..., k] (zero mean per group).

    Model: P(i beats j) = sigmoid(theta_i - theta_j). ``wins`` [..., k, k] (soft) counts;
    ``prior`` pseudo-wins are added to every ordered pair so that a candidate that never
    wins still gets a finite (low) strength; ``prior=0`` is the plain MLE, which exists
    only when every candidate wins and loses some comparison. ``method``: "mm" is Hunter's
    minorise-maximise update, "newton" Newton-Raphson with step halving; both reach the
    same optimum. Fitted in float64; returns the dtype of ``wins``.
    """
    _check_wins(wins)
    if method not in ("mm", "newton"):
        raise ValueError(f"method must be 'mm' or 'newton', got {method!r}")
    if not prior >= 0:
        raise ValueError(f"prior must be >= 0, got {prior!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    k = wins.shape[-1]
    if k == 1:
        return torch.zeros(wins.shape[:-1], dtype=wins.dtype, device=wins.device)
    w = _off_diagonal(wins.double() + prior)
    games = w + w.transpose(-1, -2)
    total_wins = w.sum(-1)
    if bool((total_wins <= 0).any()):
        raise ValueError("wins: a candidate never wins, so the prior=0 MLE does not exist; use prior > 0")
    theta = torch.zeros(wins.shape[:-1], dtype=torch.float64, device=wins.device)
    ones = torch.ones(k, k, dtype=torch.float64, device=wins.device)
    steps = 0.5 ** torch.arange(12, dtype=torch.float64, device=wins.device)
    for _ in range(max_iter):
        if method == "mm":
            p = theta.exp()
            denom = (games / (p.unsqueeze(-1) + p.unsqueeze(-2))).sum(-1)
            new = torch.log(total_wins / denom)
        else:
            s = torch.sigmoid(theta.unsqueeze(-1) - theta.unsqueeze(-2))
            grad = total_wins - (games * s).sum(-1)
            curv = games * s * (1 - s)
            neg_hess = torch.diag_embed(curv.sum(-1)) - curv
            # -H is singular along the all-ones direction (strengths are relative); adding
            # 11^T fixes it, and since grad sums to zero the step stays zero-mean.
            delta = torch.linalg.solve(neg_hess + ones, grad.unsqueeze(-1)).squeeze(-1)
            tries = theta.unsqueeze(-2) + steps.unsqueeze(-1) * delta.unsqueeze(-2)
            gains = _bt_loglik(tries, w.unsqueeze(-3)) - _bt_loglik(theta, w).unsqueeze(-1)
            # The largest halving of the Newton step that does not lower the likelihood.
            best = torch.argmax((gains >= 0).to(torch.int8), dim=-1, keepdim=True)
            new = torch.gather(tries, -2, best.unsqueeze(-1).expand(*best.shape, k)).squeeze(-2)
        new = new - new.mean(-1, keepdim=True)
        change = (new - theta).abs().max()
        theta = new
        if change <= tol:
            break
    return theta.to(wins.dtype)


def _normal_v_w(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # v = phi(t) / Phi(t) in log space so that it stays finite for very negative t.
    log_phi = -0.5 * t * t - 0.5 * math.log(2 * math.pi)
    v = torch.exp(log_phi - torch.special.log_ndtr(t))
    return v, v * (v + t)


def trueskill(
    wins: torch.Tensor,
    *,
    mu: float = 25.0,
    sigma: float = 25.0 / 3.0,
    beta: float = 25.0 / 6.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TrueSkill-style Bayesian ratings from a win matrix: ``(mu, sigma)``, each [..., k].

    Every candidate starts at N(mu, sigma^2). Pairs (i, j), i < j, are played once in index
    order; the winner is the side with more wins (``wins[i, j]`` vs ``wins[j, i]``) and an
    exact tie is skipped (draws are not modelled). Each game applies the two-player
    TrueSkill update with performance noise ``beta``. Rank by the returned ``mu``.
    """
    _check_wins(wins)
    if not (sigma > 0 and beta > 0):
        raise ValueError(f"sigma and beta must be > 0, got sigma={sigma!r}, beta={beta!r}")
    k = wins.shape[-1]
    w = wins.double()
    means = torch.full(wins.shape[:-1], float(mu), dtype=torch.float64, device=wins.device)
    variances = torch.full_like(means, float(sigma) ** 2)
    for i in range(k):
        for j in range(i + 1, k):
            margin = w[..., i, j] - w[..., j, i]
            played = margin != 0
            sign = torch.sign(margin)  # +1: i won, -1: j won
            c2 = 2 * beta**2 + variances[..., i] + variances[..., j]
            c = c2.sqrt()
            t = sign * (means[..., i] - means[..., j]) / c
            v, w_factor = _normal_v_w(t)
            var_i, var_j = variances[..., i].clone(), variances[..., j].clone()
            means[..., i] += torch.where(played, sign * var_i / c * v, 0.0)
            means[..., j] -= torch.where(played, sign * var_j / c * v, 0.0)
            variances[..., i] *= torch.where(played, 1 - var_i / c2 * w_factor, 1.0)
            variances[..., j] *= torch.where(played, 1 - var_j / c2 * w_factor, 1.0)
    return means.to(wins.dtype), variances.sqrt().to(wins.dtype)


def candidate_ratings(
    scores: torch.Tensor,
    *,
    method: Literal["score", "bradley_terry", "trueskill"] = "score",
    wins: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ratings [..., k] to rank (and weight) candidates by, higher is better.

    "score": the scores themselves; "bradley_terry": BT log-strengths; "trueskill": TrueSkill
    means. The two fitted methods use ``wins`` (e.g. :func:`entropy_wins`, optionally
    anchored with the human pair) or, when it is None, the pairwise order of ``scores``.
    """
    _check_ratings(scores, "scores")
    if method == "score":
        return scores
    if method not in RATING_METHODS:
        raise ValueError(f"method must be one of {RATING_METHODS}, got {method!r}")
    if wins is None:
        wins = wins_from_scores(scores)
    elif wins.shape != (*scores.shape, scores.shape[-1]):
        raise ValueError(f"wins must have shape {(*scores.shape, scores.shape[-1])}, got {tuple(wins.shape)}")
    if method == "bradley_terry":
        return bradley_terry(wins).to(scores.dtype)
    return trueskill(wins)[0].to(scores.dtype)


def _check_count(name: str, value: int, upper: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= upper:
        raise ValueError(f"{name} must be an integer in [0, {upper}], got {value!r}")


def trim_mask(ratings: torch.Tensor, trim: int) -> torch.Tensor:
    """Bool [..., k]: False for the ``trim`` lowest-rated candidates of each group.

    Ties among the lowest are trimmed from the highest index first (the reverse of
    :func:`rank_order`); at least one candidate is always kept.
    """
    _check_ratings(ratings)
    k = ratings.shape[-1]
    _check_count("trim", trim, k - 1)
    order = rank_order(ratings)
    kept_ranks = torch.arange(k, device=ratings.device) < k - trim
    return torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, kept_ranks.expand_as(order))


def top_bottom_pairs(ratings: torch.Tensor, n_pairs: int = 1, *, trim: int = 0) -> torch.Tensor:
    """Pairs (better, worse) of candidate indices, [..., n_pairs, 2] int64.

    Pair r joins the r-th best with the r-th worst of the candidates left after trimming the
    ``trim`` lowest (best vs worst, second vs second-worst, ...), e.g. as (chosen, rejected)
    for DPO on self-ranked candidates.
    """
    _check_ratings(ratings)
    k = ratings.shape[-1]
    _check_count("trim", trim, k - 2)
    kept = k - trim
    if not isinstance(n_pairs, int) or not 1 <= n_pairs <= kept // 2:
        raise ValueError(f"n_pairs must be an integer in [1, {kept // 2}] (k={k}, trim={trim}), got {n_pairs!r}")
    order = rank_order(ratings)
    best = order[..., :n_pairs]
    worst = order[..., kept - n_pairs : kept].flip(-1)
    return torch.stack((best, worst), dim=-1)
