"""The ``naive`` backend: materialises the full ``[N, V]`` logits and lets autograd do the rest.

It is the plain-torch formulation every peer compares with, and the yardstick for the fused
backends' numbers and memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .logit_map import LogitMap


def _log_softmax_and_entropy(logits: torch.Tensor, logit_map: LogitMap) -> tuple[torch.Tensor, torch.Tensor]:
    z = logit_map.apply(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    logp = z.log_softmax(-1)
    p = logp.exp()
    # Masked vocabulary (-inf logits) has p = 0 and logp = -inf: zero the log before the
    # product, or the backward of p * logp computes 0 * -inf = nan.
    finite_logp = torch.where(p > 0, logp, torch.zeros((), dtype=p.dtype, device=p.device))
    return logp, -(p * finite_logp).sum(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / T) over the last dim: [..., V] -> [...]."""
    return _log_softmax_and_entropy(logits, LogitMap(1.0 / temperature))[1].float()


def logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    logit_map: LogitMap,
    ignore_index: int,
    with_extras: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Target log-prob and entropy per token: hidden [N, H], weight [V, H] -> two float32 [N]; with
    ``with_extras`` also max z (float32), its first argmax (int64), Σ_j z_j and log Σ_j p_j² (float32),
    no gradient."""
    logits = F.linear(hidden, weight, bias)
    logp_all, entropy = _log_softmax_and_entropy(logits, logit_map)
    valid = targets != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, targets, 0)[:, None]).squeeze(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    out = (torch.where(valid, logp, zero).float(), torch.where(valid, entropy, zero).float())
    if not with_extras:
        return out
    z = logit_map.apply(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)))
    max_logit, argmax = z.max(-1)
    log_sum_sq = torch.logsumexp(2 * logp_all.detach(), -1)
    return *out, *(torch.where(valid, t, 0) for t in (max_logit.float(), argmax, z.sum(-1).float(), log_sum_sq.float()))
