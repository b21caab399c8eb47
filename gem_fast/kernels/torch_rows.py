"""Vocab-row math on a block of logits in plain torch (the ``torch`` backend).

Same contract as :mod:`gem_fast.kernels.triton_rows`: ``logits`` is a ``[R, V]`` block of raw
logits x (bias included); the softmax sees z = ``logit_map``(x) (scale, soft-cap, temperature),
and work happens in float32 whatever the block's dtype. Every function works on row slices
whose float32 copy is no larger than the block itself (half the rows of a bf16 block) and
allocates at most two such temporaries (in-place ops otherwise): on a CPU these passes over
memory, not the FLOPs, are what the chunked path pays beyond the GEMMs.
"""

from __future__ import annotations

import torch

from .logit_map import LogitMap, RowExtras

# The functions allocate per-row temporaries, so callers hand them block-sized row chunks.
STREAMS_ROWS = False


def _slices(logits: torch.Tensor) -> list[slice]:
    """Row slices whose float32 working copy takes no more bytes than the slice of ``logits``
    they came from takes in the whole block (float64 stays float64: the tests' reference)."""
    n_rows = logits.shape[0]
    step = max(1, n_rows * logits.element_size() // 4)
    return [slice(start, start + step) for start in range(0, n_rows, step)]


def _mapped_finite(logits: torch.Tensor, logit_map: LogitMap, into: torch.Tensor | None = None) -> torch.Tensor:
    # A float copy (float64 input stays float64: tests use it as the reference), into ``into``
    # if given. -inf logits (masked vocabulary) become the most negative finite value: exp gives
    # exactly 0 and products with a zero probability stay 0 instead of 0 * -inf = nan.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype, copy=True) if into is None else into.copy_(logits)
    return logit_map.apply_(z).clamp_(min=torch.finfo(dtype).min)


def row_stats(
    logits: torch.Tensor, targets: torch.Tensor | None, logit_map: LogitMap, extras: RowExtras | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row log-sum-exp, entropy (nats) and target logit of z = ``logit_map``(logits).

    logits [R, V]; targets [R] int64 or None (a target outside [0, V) matches nothing and gives
    target logit 0). Returns three float32 [R] tensors (the last is None without targets).
    ``extras``: [R] tensors to fill with the row's max z, its first argmax, Σ_j z_j and Σ_j e^{2(z_j - max)}.
    """
    parts = [_row_stats(logits[part], None if targets is None else targets[part], logit_map,
                        None if extras is None else extras.rows(part))
             for part in _slices(logits)]
    if len(parts) == 1:
        return parts[0]
    lse, entropy, target_logit = zip(*parts)
    return torch.cat(lse), torch.cat(entropy), None if targets is None else torch.cat(target_logit)


def _row_stats(
    logits: torch.Tensor, targets: torch.Tensor | None, logit_map: LogitMap, extras: RowExtras | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    z = _mapped_finite(logits, logit_map)
    target_logit = None
    if targets is not None:
        in_range = (targets >= 0) & (targets < z.shape[-1])
        picked = z.gather(-1, torch.where(in_range, targets, 0)[:, None]).squeeze(-1)
        target_logit = torch.where(in_range, picked, 0.0).float()
    if extras is None:
        row_max = z.amax(-1, keepdim=True)
    else:
        extras.logit_sum.copy_(z.sum(-1))  # before the shift below overwrites z
        row_max, argmax = z.max(-1, keepdim=True)  # the first maximum, as argmax
        extras.max_logit.copy_(row_max.squeeze(-1))
        extras.argmax.copy_(argmax.squeeze(-1))
    # Entropy from logits shifted by the row max: H = log s - Σ e (z - m) / s. The unshifted
    # lse - Σ p z cancels two numbers of size |z| and loses everything when logits are ~ -1e3.
    shifted = z.sub_(row_max)
    e = shifted.exp()
    s = e.sum(-1)
    # Σ e·(z - m) in place of the shifted logits; torch's sum, not a BLAS dot, because its
    # pairwise reduction keeps fp32 error flat over a 128k vocab (a dot grows with V).
    t = shifted.mul_(e).sum(-1)
    if extras is not None:
        extras.sum_sq_exp.copy_(e.square_().sum(-1))  # e is not needed after this
    lse = row_max.squeeze(-1) + torch.log(s)
    return lse.float(), (torch.log(s) - t / s).float(), target_logit


def row_grad(
    logits: torch.Tensor,
    targets: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor,
    logit_map: LogitMap,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write d(loss)/d(logits) into ``out`` ([R, V], may alias ``logits``) and return it.

    With z = logit_map(x) and p = softmax(z):
    dz_j = g_lp (1[j = y] - p_j) - g_H p_j (z_j - (lse - H)); d(logits) = dz · dz/dx.
    """
    for part in _slices(logits):
        _row_grad(logits[part], None if targets is None else targets[part], lse[part], entropy[part],
                  None if grad_logp is None else grad_logp[part], grad_entropy[part], logit_map, out[part])
    return out


def row_stats_and_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    logit_map: LogitMap,
    out: torch.Tensor,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """:func:`row_stats` then :func:`row_grad` on the same block: ``((lse, entropy, target
    logit), out)``, for losses whose upstream weights are known before the forward."""
    stats = row_stats(logits, targets, logit_map)
    return stats, row_grad(logits, targets, stats[0], stats[1], grad_logp, grad_entropy, logit_map, out)


def _row_grad(
    logits: torch.Tensor,
    targets: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor,
    logit_map: LogitMap,
    out: torch.Tensor,
) -> None:
    z = _mapped_finite(logits, logit_map)
    dtype = z.dtype
    p = (z - lse[:, None].to(dtype)).exp_()
    d_z = z.sub_((lse - entropy)[:, None].to(dtype)).mul_(p).mul_(-grad_entropy[:, None].to(dtype))
    if targets is not None:
        d_z.sub_(p.mul_(grad_logp[:, None].to(dtype)))
        in_range = (targets >= 0) & (targets < z.shape[-1])
        rows = torch.arange(z.shape[0], device=z.device)
        d_z.index_put_(
            (rows, torch.where(in_range, targets, 0)),
            torch.where(in_range, grad_logp.to(dtype), 0.0),
            accumulate=True,
        )
    if logit_map.softcap is None:
        d_z.mul_(logit_map.factor)
    else:
        # The soft-cap's slope needs z again: recomputed into p's buffer, which is free by now.
        d_z.mul_(logit_map.softcap_slope_(_mapped_finite(logits, logit_map, into=p)))
    out.copy_(d_z)
