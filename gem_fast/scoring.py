"""Entropy-guided scoring of chain-of-thought candidates (GEM, Eq. 1).

For one candidate with per-token entropies ``H_t`` (nats) over its valid generated tokens,
split into final-answer tokens F and reasoning tokens R (the other valid tokens):

    S = -mean_{t in F} H_t  +  lambda_fork * mean_{t in M} H_t,

where M is the set of the top-m largest entropies in R (the "fork" tokens). A candidate is
good when it branches mid-chain and is confident in its answer.

Choices the paper leaves open, made here:

* ``top_m < 1`` is a fraction of |R|: m = ceil(top_m * |R|), at least 1; ``top_m >= 1`` is a
  count (an integer), capped at |R|. Which of tied entropies enters M does not change S.
* A candidate with no reasoning tokens gets a fork term of 0 (an empty mean), the lowest a
  fork term can be since entropies are >= 0.
* A candidate with no final-answer tokens gets ``S = -inf``: the lowest score in any group,
  so it ranks last and, after the softmax mapping, gets zero reward. Padding and post-EOS
  tokens never count (``valid_mask``); the EOS token itself counts when the mask includes it
  (it is the step at which the model commits to stopping).
* The final span is built by one of the helpers below: an answer marker in the decoded text
  (tokens after the marker, the marker's own tokens excluded), the last n tokens, or the
  last fraction of the tokens (the official code's choice, 25 %). A marker that is missing,
  or followed by nothing, falls back to one of the other two only when asked to.
  :func:`answer_span` picks among them as a run's ``SegaConfig`` says (SEGA, the gates and the
  calibration all score with it).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Protocol, Sequence

import torch

from gem_fast.config import SegaConfig

__all__ = [
    "DEFAULT_MARKERS",
    "answer_span",
    "entropy_score",
    "top_m_mask",
    "final_mask_last_n",
    "final_mask_last_fraction",
    "final_mask_from_marker",
]

DEFAULT_MARKERS: tuple[str, ...] = ("Answer:", "####")

# ceil(f * n) in floating point overshoots when f * n is an integer that f cannot hold
# exactly (0.1 * 30 = 3.0000000000000004); the slack is far below 1 / n for any real length.
_CEIL_SLACK = 1e-9


class _BatchDecoder(Protocol):
    def batch_decode(self, sequences: list[list[int]]) -> list[str]: ...


def _bool_mask(mask: torch.Tensor, name: str, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")
    if mask.device != like.device:
        raise ValueError(f"{name} is on {mask.device}, expected {like.device}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"{name} must be bool or integer, got {mask.dtype}")
    return mask.bool()


def _ceil_fraction(count: torch.Tensor, fraction: float) -> torch.Tensor:
    """ceil(fraction * count), at least 1 where count > 0, 0 where count == 0."""
    m = torch.ceil(count.double() * fraction - _CEIL_SLACK).long()
    return torch.minimum(m.clamp(min=1), count)


def _check_top_m(top_m: float) -> None:
    if not (isinstance(top_m, (int, float)) and math.isfinite(top_m) and top_m > 0):
        raise ValueError(f"top_m must be a positive number, got {top_m!r}")
    if top_m >= 1 and top_m != int(top_m):
        raise ValueError(f"top_m >= 1 is a count and must be an integer, got {top_m!r}")


def _top_m_sorted(
    entropy: torch.Tensor, reasoning: torch.Tensor, top_m: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reasoning entropies sorted descending, their positions, the in-top-m flags and m."""
    n_reason = reasoning.sum(-1)
    if top_m < 1:
        m = _ceil_fraction(n_reason, top_m)
    else:
        m = torch.clamp(n_reason, max=int(top_m))
    # Stable sort: among tied entropies the earliest token enters the top-m set.
    values, positions = torch.sort(
        entropy.masked_fill(~reasoning, float("-inf")), dim=-1, descending=True, stable=True
    )
    rank = torch.arange(entropy.shape[-1], device=entropy.device)
    selected = rank < m.unsqueeze(-1)
    return values, positions, selected, m


def top_m_mask(token_entropy: torch.Tensor, reasoning_mask: torch.Tensor, top_m: float) -> torch.Tensor:
    """Bool [..., T]: the top-m highest-entropy tokens among ``reasoning_mask`` (the fork set M)."""
    _check_top_m(top_m)
    reasoning = _bool_mask(reasoning_mask, "reasoning_mask", token_entropy)
    _, positions, selected, _ = _top_m_sorted(token_entropy.float(), reasoning, top_m)
    return torch.zeros_like(reasoning).scatter(-1, positions, selected)


def entropy_score(
    token_entropy: torch.Tensor,
    final_mask: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
    *,
    lambda_fork: float = 0.4,
    top_m: float = 0.1,
    final_weight: float = 1.0,
) -> torch.Tensor:
    """Eq. 1 score of each candidate: ``-final_weight * mean(H_final) + lambda_fork * mean(top-m H_reasoning)``.

    ``final_weight`` 1 is Eq. 1; 0 drops the terminal term (the paper's ablation), the answer span then
    only says which tokens are reasoning.

    ``token_entropy`` [..., T] float (nats); ``final_mask`` and ``valid_mask`` [..., T] bool
    (``valid_mask=None``: every position is valid). Returns float32 [...]; ``-inf`` for a
    candidate without valid final-answer tokens. Batched: leading dims are e.g. [B, k].
    """
    if not isinstance(token_entropy, torch.Tensor) or not token_entropy.dtype.is_floating_point:
        raise ValueError("token_entropy must be a floating-point torch.Tensor")
    if token_entropy.dim() < 1:
        raise ValueError("token_entropy must have a token dimension [..., T]")
    if not (isinstance(lambda_fork, (int, float)) and math.isfinite(lambda_fork)):
        raise ValueError(f"lambda_fork must be a finite number, got {lambda_fork!r}")
    if not (isinstance(final_weight, (int, float)) and math.isfinite(final_weight)):
        raise ValueError(f"final_weight must be a finite number, got {final_weight!r}")
    _check_top_m(top_m)
    entropy = token_entropy.float()
    final = _bool_mask(final_mask, "final_mask", entropy)
    valid = (
        torch.ones_like(final) if valid_mask is None else _bool_mask(valid_mask, "valid_mask", entropy)
    )
    final = final & valid
    reasoning = valid & ~final

    n_final = final.sum(-1)
    final_mean = entropy.masked_fill(~final, 0.0).sum(-1) / n_final.clamp(min=1)
    values, _, selected, m = _top_m_sorted(entropy, reasoning, top_m)
    fork_mean = values.masked_fill(~selected, 0.0).sum(-1) / m.clamp(min=1)
    score = -final_weight * final_mean + lambda_fork * fork_mean
    return score.masked_fill(n_final == 0, float("-inf"))


def _valid_or_all(valid_mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(valid_mask, torch.Tensor) or valid_mask.dim() < 1:
        raise ValueError("valid_mask must be a torch.Tensor [..., T]")
    return _bool_mask(valid_mask, "valid_mask", valid_mask)


def _last_k(valid: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    # Number of valid tokens at or after each position; works for left or right padding.
    remaining = valid.long().flip(-1).cumsum(-1).flip(-1)
    if isinstance(k, torch.Tensor):
        k = k.unsqueeze(-1)
    return valid & (remaining <= k)


def final_mask_last_n(valid_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Bool [..., T]: the last ``n`` valid tokens of each row (all of them if fewer)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return _last_k(_valid_or_all(valid_mask), n)


def final_mask_last_fraction(valid_mask: torch.Tensor, fraction: float = 0.25) -> torch.Tensor:
    """Bool [..., T]: the last ceil(``fraction`` * length) valid tokens of each row (>= 1)."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    valid = _valid_or_all(valid_mask)
    return _last_k(valid, _ceil_fraction(valid.sum(-1), fraction))


def final_mask_from_marker(
    sequences: torch.Tensor,
    valid_mask: torch.Tensor,
    tokenizer: _BatchDecoder,
    *,
    markers: Sequence[str] = DEFAULT_MARKERS,
    fallback: Literal["last_n", "last_fraction"] | None = None,
    fallback_value: float = 0.25,
) -> torch.Tensor:
    """Bool [..., T]: the tokens after the last answer marker in each row's decoded text.

    ``sequences`` [..., T] token ids, ``valid_mask`` [..., T]; ``tokenizer`` needs only
    ``batch_decode``. A token that straddles the marker's end (e.g. ``": 42"``) is a final
    token; tokens inside the marker are not. Where the last marker is missing or followed
    by no token, ``fallback`` ("last_n" with ``fallback_value`` tokens, or "last_fraction"
    with that fraction) decides; with ``fallback=None`` the row has no final tokens.
    """
    if not isinstance(sequences, torch.Tensor) or sequences.dtype.is_floating_point:
        raise ValueError("sequences must be an integer torch.Tensor [..., T]")
    valid = _bool_mask(valid_mask, "valid_mask", sequences)
    if isinstance(markers, str) or not markers or not all(isinstance(m, str) and m for m in markers):
        raise ValueError(f"markers must be a non-empty sequence of non-empty strings, got {markers!r}")
    if fallback not in (None, "last_n", "last_fraction"):
        raise ValueError(f"fallback must be None, 'last_n' or 'last_fraction', got {fallback!r}")
    if fallback == "last_n" and not (fallback_value >= 1 and fallback_value == int(fallback_value)):
        raise ValueError(f"fallback_value must be a positive integer for 'last_n', got {fallback_value!r}")
    if fallback == "last_fraction" and not 0 < fallback_value <= 1:
        raise ValueError(f"fallback_value must be in (0, 1] for 'last_fraction', got {fallback_value!r}")

    flat_valid = valid.reshape(-1, valid.shape[-1]).cpu()
    flat_ids = sequences.reshape(flat_valid.shape).cpu()
    # One tokenizer call for every valid token of the batch; each piece decoded on its own so
    # that character offsets map back to tokens exactly.
    pieces = tokenizer.batch_decode(flat_ids[flat_valid].unsqueeze(-1).tolist())
    piece_len = torch.zeros(flat_valid.shape, dtype=torch.long)
    piece_len[flat_valid] = torch.tensor([len(p) for p in pieces], dtype=torch.long)
    token_end = piece_len.cumsum(-1)

    marker_end = torch.full((flat_valid.shape[0],), -1, dtype=torch.long)
    row_start = 0
    for row, n_tokens in enumerate(flat_valid.sum(-1).tolist()):
        text = "".join(pieces[row_start : row_start + n_tokens])
        row_start += n_tokens
        # The last marker occurrence wins: a chain may quote the marker before answering.
        found = [(text.rfind(m), len(m)) for m in markers]
        start, length = max(found)
        if start >= 0:
            marker_end[row] = start + length
    final = flat_valid & (marker_end.unsqueeze(-1) >= 0) & (token_end > marker_end.unsqueeze(-1))
    final = final.reshape(valid.shape).to(valid.device)

    if fallback is not None:
        backup = (
            final_mask_last_n(valid, int(fallback_value))
            if fallback == "last_n"
            else final_mask_last_fraction(valid, fallback_value)
        )
        final = torch.where(final.any(-1, keepdim=True), final, backup)
    return final


def answer_span(sega: SegaConfig, sequences: torch.Tensor, mask: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """Bool [..., T]: the tokens Eq. 1 scores as the answer, per ``sega.final_span``: after "Answer:" / "####"
    (else, with ``marker_fallback``, the last ``final_fraction``; without, none: score -inf), or the last fraction."""
    if sega.final_span == "marker":
        return final_mask_from_marker(sequences, mask, tokenizer,
                                      fallback="last_fraction" if sega.marker_fallback else None,
                                      fallback_value=sega.final_fraction)
    return final_mask_last_fraction(mask, sega.final_fraction)
