"""Vocab-row math on a block of logits in plain torch (the ``torch`` backend).

Same contract as :mod:`gem_fast.kernels.triton_rows`: ``logits`` is a ``[R, V]`` block of raw
logits (bias included, temperature not yet applied), work happens in float32 whatever its dtype.
"""

from __future__ import annotations

import torch


def _scaled_float(logits: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    # float64 input stays float64 (tests use it as the reference); everything else goes to fp32.
    return logits.to(torch.promote_types(logits.dtype, torch.float32)) * inv_temperature


def _p_times(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # p * x with 0 where p == 0, so that -inf logits (masked vocab) give 0, not 0 * -inf = nan.
    return torch.where(p > 0, p * x, torch.zeros((), dtype=p.dtype, device=p.device))


def row_stats(
    logits: torch.Tensor, targets: torch.Tensor | None, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row log-sum-exp, entropy (nats) and target logit of ``logits * inv_temperature``.

    logits [R, V]; targets [R] int64 or None (a target outside [0, V) matches nothing and gives
    target logit 0). Returns three float32 [R] tensors (the last is None without targets).
    """
    z = _scaled_float(logits, inv_temperature)
    # Entropy from logits shifted by the row max: H = log s - Σ e (z - m) / s. The unshifted
    # lse - Σ p z cancels two numbers of size |z| and loses everything when logits are ~ -1e3.
    row_max = z.amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
    e = torch.exp(z - shift)
    s = e.sum(-1)
    lse = shift.squeeze(-1) + torch.log(s)
    entropy = torch.log(s) - _p_times(e, z - shift).sum(-1) / s
    target_logit = None
    if targets is not None:
        in_range = (targets >= 0) & (targets < z.shape[-1])
        picked = z.gather(-1, torch.where(in_range, targets, 0)[:, None]).squeeze(-1)
        target_logit = torch.where(in_range, picked, 0.0).float()
    return lse.float(), entropy.float(), target_logit


def row_grad(
    logits: torch.Tensor,
    targets: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor,
    inv_temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write d(loss)/d(logits) into ``out`` ([R, V], may alias ``logits``) and return it.

    With z = logits * inv_temperature and p = softmax(z):
    dz_j = g_lp (1[j = y] - p_j) - g_H p_j (z_j - (lse - H)); d(logits) = dz * inv_temperature.
    """
    z = _scaled_float(logits, inv_temperature)
    p = torch.exp(z - lse[:, None].to(z.dtype))
    mean_z = (lse - entropy)[:, None].to(z.dtype)
    dz = -grad_entropy[:, None].to(z.dtype) * _p_times(p, z - mean_z)
    if targets is not None:
        dz -= grad_logp[:, None].to(z.dtype) * p
        in_range = (targets >= 0) & (targets < z.shape[-1])
        rows = torch.arange(z.shape[0], device=z.device)
        dz.index_put_(
            (rows, torch.where(in_range, targets, 0)),
            torch.where(in_range, grad_logp.to(z.dtype), 0.0),
            accumulate=True,
        )
    out.copy_(dz * inv_temperature)
    return out
