"""Vocab-row math on a block of logits as Triton kernels (the ``triton`` backend).

One kernel family: each program owns ``BLOCK_R`` rows and streams the vocabulary in
``BLOCK_V`` tiles, keeping the online softmax statistics (running max ``m``, ``s = Σ e^{z-m}``,
``t = Σ e^{z-m} (z-m)``) in fp32 registers, so no probability tensor is ever written. The
softmax sees z = LogitMap(x) of the raw logits x (scale, soft-cap, temperature).
``row_stats`` gives log-sum-exp, entropy and the target logit; ``row_grad`` writes the logit
gradient tile by tile (in place when ``out`` is the logits block); ``row_stats_and_grad`` does
both in one kernel, the second sweep of a row reading it back from L2 rather than HBM.

On a machine without CUDA this module must be imported with ``TRITON_INTERPRET=1`` set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logit_map import LogitMap

# Upper bound on the vocab tile. Tests lower it to force several ragged tiles on small vocabs.
MAX_BLOCK_V = 4096
# The kernels hold a row's statistics in registers and allocate nothing per row, so a whole
# logits tensor goes in one launch.
STREAMS_ROWS = True


@triton.jit
def _tanh(y):
    # From exp (no libdevice in every Triton version): sign(y) (1 - e^{-2|y|}) / (1 + e^{-2|y|}).
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0, -t, t)


@triton.jit
def _load_mapped(ptrs, ok, factor, pre, post, HAS_SOFTCAP: tl.constexpr):
    """z = LogitMap(x) of a tile in fp32; columns outside the row read as -inf (exp(-inf) = 0)."""
    x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z = post * _tanh(x * pre)
    else:
        z = x * factor
    return tl.where(ok, z, float("-inf"))


@triton.jit
def _online_softmax_update(m, s, t, z):
    """Tile z [BLOCK_R, BLOCK_V] into each row's running max m, s = Σ e^{z-m} and t = Σ e^{z-m} (z-m)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    shift = tl.where(m_new > float("-inf"), m_new, 0.0)
    e = tl.exp(z - shift[:, None])
    # t relative to the running max (not Σ e^{z-m} z, which cancels catastrophically for logits of
    # large magnitude); moving m re-bases the old sum.
    alpha = tl.exp(m - shift)
    rebase = tl.where(s > 0, (m - shift) * s, 0.0)
    t = alpha * (t + rebase) + tl.sum(tl.where(e > 0, e * (z - shift[:, None]), 0.0), axis=1)
    return m_new, s * alpha + tl.sum(e, axis=1), t


@triton.jit
def _online_stats(row_base, row_ok, tgt, V, factor, pre, post,
                  HAS_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """(lse, entropy, target logit) of BLOCK_R rows of z = LogitMap(logits), one sweep over V."""
    # -inf start (not 0): all-negative logits must not be clipped at exp(0 - 0).
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    t = tl.zeros([BLOCK_R], tl.float32)
    tz = tl.zeros([BLOCK_R], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < V)[None, :]
        # Out-of-range columns read as -inf so they add exp(-inf) = 0, never exp(0).
        z = _load_mapped(row_base + cols[None, :], ok, factor, pre, post, HAS_SOFTCAP)
        m, s, t = _online_softmax_update(m, s, t, z)
        if HAS_TARGET:
            tz += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    return m + tl.log(s), tl.log(s) - t / s, tz


@triton.jit
def _round_to_bfloat16(x):
    # Round-to-nearest-even in the bits, leaving a value bf16 holds exactly: the GPU's cast
    # rounds like this, but the interpreter's truncates, which would double the CPU error.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _write_grad(row_base, out_base, row_ok, tgt, lse, entropy, g_lp, g_h, V, factor, pre, post,
                HAS_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """d(logits) = dz/dx · (g_lp (1[j = y] - p_j) - g_H p_j (z_j - (lse - H))), tile by tile."""
    mean_z = lse - entropy
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < V)[None, :]
        z = _load_mapped(row_base + cols[None, :], ok, factor, pre, post, HAS_SOFTCAP)
        p = tl.exp(z - lse[:, None])
        dz = -g_h[:, None] * tl.where(p > 0, p * (z - mean_z[:, None]), 0.0)
        if HAS_TARGET:
            dz += g_lp[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
        if HAS_SOFTCAP:
            tanh = z / post
            d_logits = dz * factor * (1.0 - tanh * tanh)
        else:
            d_logits = dz * factor
        if out_base.dtype.element_ty == tl.bfloat16:
            d_logits = _round_to_bfloat16(d_logits)
        tl.store(out_base + cols[None, :], d_logits, mask=ok)


@triton.jit
def _row_stats_kernel(
    z_ptr, stride_z, tgt_ptr, lse_ptr, ent_ptr, tz_ptr, R, V, factor, pre, post,
    HAS_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    tgt = rows  # unused without targets
    if HAS_TARGET:
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    lse, ent, tz = _online_stats(z_ptr + rows.to(tl.int64)[:, None] * stride_z, row_ok, tgt, V, factor, pre, post,
                                 HAS_TARGET, HAS_SOFTCAP, BLOCK_R, BLOCK_V)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(ent_ptr + rows, ent, mask=row_ok)
    if HAS_TARGET:
        tl.store(tz_ptr + rows, tz, mask=row_ok)


@triton.jit
def _row_grad_kernel(
    z_ptr, stride_z, out_ptr, stride_out, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gh_ptr, R, V, factor, pre, post,
    HAS_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)[:, None]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    g_h = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
    tgt, g_lp = rows, g_h  # unused without targets
    if HAS_TARGET:
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    _write_grad(z_ptr + rows64 * stride_z, out_ptr + rows64 * stride_out, row_ok, tgt, lse, ent, g_lp, g_h,
                V, factor, pre, post, HAS_TARGET, HAS_SOFTCAP, BLOCK_V)


@triton.jit
def _row_stats_and_grad_kernel(
    z_ptr, stride_z, out_ptr, stride_out, tgt_ptr, lse_ptr, ent_ptr, tz_ptr, glp_ptr, gh_ptr, R, V, factor, pre, post,
    HAS_SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)[:, None]
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    row_base = z_ptr + rows64 * stride_z
    lse, ent, tz = _online_stats(row_base, row_ok, tgt, V, factor, pre, post, True, HAS_SOFTCAP, BLOCK_R, BLOCK_V)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(ent_ptr + rows, ent, mask=row_ok)
    tl.store(tz_ptr + rows, tz, mask=row_ok)
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    g_h = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
    _write_grad(row_base, out_ptr + rows64 * stride_out, row_ok, tgt, lse, ent, g_lp, g_h,
                V, factor, pre, post, True, HAS_SOFTCAP, BLOCK_V)


def _launch_config(logits: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps). On a GPU a program streams one row in tiles of up to 4096
    (a Llama-3 row is 32 tiles), or several short rows at once so that a tile keeps ~4096
    elements in flight; the interpreter takes 16 rows a program to cut Python overhead."""
    block_v = min(triton.next_power_of_2(logits.shape[1]), MAX_BLOCK_V)
    if logits.is_cuda:
        return max(1, min(16, 4096 // block_v)), block_v, 8 if block_v >= 2048 else 4
    return 16, block_v, 1


def _map_args(logit_map: LogitMap) -> dict:
    """Kernel arguments of the logit map: z = x·factor, or post·tanh(x·pre) with soft-capping."""
    softcap = logit_map.softcap
    return dict(factor=logit_map.factor, pre=logit_map.scale / softcap if softcap is not None else 1.0,
                post=softcap * logit_map.inv_temperature if softcap is not None else 1.0,
                HAS_SOFTCAP=softcap is not None)


def _unit_stride(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(1) == 1 else logits.contiguous()


def _check_out(out: torch.Tensor) -> None:
    if out.stride(1) != 1:
        raise ValueError("out: the vocab dimension must have unit stride")


def row_stats(
    logits: torch.Tensor, targets: torch.Tensor | None, logit_map: LogitMap
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row log-sum-exp, entropy (nats) and target logit of z = ``logit_map``(logits).

    logits [R, V] (rows may be strided); targets [R] int64 or None (a target outside [0, V)
    matches nothing and gives target logit 0). Returns float32 [R] tensors.
    """
    logits = _unit_stride(logits)
    n_rows, vocab = logits.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(lse)
    target_logit = torch.empty_like(lse) if targets is not None else None
    block_r, block_v, warps = _launch_config(logits)
    _row_stats_kernel[(triton.cdiv(n_rows, block_r),)](
        logits, logits.stride(0),
        targets.contiguous() if targets is not None else lse,
        lse, entropy, target_logit if target_logit is not None else lse,
        n_rows, vocab, **_map_args(logit_map),
        HAS_TARGET=targets is not None, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps,
    )
    return lse, entropy, target_logit


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

    dz_j = g_lp (1[j = y] - p_j) - g_H p_j (z_j - (lse - H)), d(logits) = dz · dz/dx.
    """
    logits = _unit_stride(logits)
    _check_out(out)
    n_rows, vocab = logits.shape
    block_r, block_v, warps = _launch_config(logits)
    has_target = targets is not None
    _row_grad_kernel[(triton.cdiv(n_rows, block_r),)](
        logits, logits.stride(0), out, out.stride(0),
        targets.contiguous() if has_target else lse,
        lse.contiguous(), entropy.contiguous(),
        grad_logp.contiguous() if has_target else lse,
        grad_entropy.contiguous(),
        n_rows, vocab, **_map_args(logit_map),
        HAS_TARGET=has_target, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps,
    )
    return out


def row_stats_and_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    logit_map: LogitMap,
    out: torch.Tensor,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Statistics and logit gradient of a block in one kernel: ``((lse, entropy, target logit),
    out)``, for losses whose upstream weights are known before the forward. ``out`` may alias
    ``logits`` (each row is read twice before it is written)."""
    logits = _unit_stride(logits)
    _check_out(out)
    n_rows, vocab = logits.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    entropy, target_logit = torch.empty_like(lse), torch.empty_like(lse)
    block_r, block_v, warps = _launch_config(logits)
    _row_stats_and_grad_kernel[(triton.cdiv(n_rows, block_r),)](
        logits, logits.stride(0), out, out.stride(0), targets.contiguous(), lse, entropy, target_logit,
        grad_logp.contiguous(), grad_entropy.contiguous(), n_rows, vocab, **_map_args(logit_map),
        BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps,
    )
    return (lse, entropy, target_logit), out
