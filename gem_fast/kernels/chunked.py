"""Token-chunked linear + vocab-row passes and their autograd Functions (``torch``/``triton``).

The logits of ``chunk`` tokens, a ``[chunk, V]`` block in the input dtype, exist one chunk at a
time: the GEMMs go to the BLAS (cuBLAS on a GPU) and the vocab-wide reductions and the logit
gradient to a row-ops module (:mod:`.torch_rows` or :mod:`.triton_rows`), which overwrites the
block with its gradient in place. Nothing of size ``[N, V]`` is allocated.

FLOPs with hidden N×H and weight V×H: ``_LinearLogprobEntropy`` spends 2NHV forward and 6NHV
backward (it recomputes the logits); ``_WeightedLogprobLoss`` knows its per-token weights before
the forward and spends 6NHV in the forward, leaving ``backward`` a scale of stored gradients.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Callable, NamedTuple

import torch

# Bytes of one chunk's logits block (counted as float32). Tests lower these to force many chunks.
CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 32 * 2**20}


def chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    """Tokens per chunk so that a ``[chunk, vocab]`` float32 block fits the device's budget."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    return max(1, min(n_rows, budget // (4 * vocab)))


class RowStats(NamedTuple):
    lse: torch.Tensor  # [N] float32, log-sum-exp of logits / T
    entropy: torch.Tensor  # [N] float32, nats
    target_logit: torch.Tensor | None  # [N] float32, (logit of the target) / T


class LinearGrads(NamedTuple):
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _block_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)


def autocast_off(fn: Callable) -> Callable:
    """Run ``fn`` with autocast disabled: the passes fix every dtype themselves (``out=`` GEMMs, fp32
    accumulators), so an enclosing ``torch.autocast`` must not recast their ops. The public API
    casts the inputs to the autocast dtype before calling in (see :mod:`gem_fast.kernels`)."""

    @functools.wraps(fn)
    def without_autocast(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return without_autocast


@autocast_off
def linear_pass(
    rows: ModuleType,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temperature: float,
    *,
    stats: RowStats | None = None,
    grad_logp: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
    needs: tuple[bool, bool, bool] = (False, False, False),
) -> tuple[RowStats, LinearGrads]:
    """One pass over token chunks of ``hidden @ weight.T + bias``; each block is computed once.

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] (outside [0, V) = no target).
    ``stats`` None: computed here. ``needs`` = which of (hidden, weight, bias) get gradients for
    per-token upstream weights ``grad_logp``, ``grad_entropy`` ([N] float32; zero on ignored rows).
    """
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    compute_stats = stats is None
    if compute_stats:
        stats = RowStats(*(torch.empty(n_rows, dtype=torch.float32, device=device) for _ in range(3)))
    need_h, need_w, need_b = needs
    # Weight and bias gradients add up over chunks: accumulate in fp32, round once at the end.
    d_hidden = torch.empty_like(hidden) if need_h else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_w else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
    step = chunk_rows(n_rows, vocab, device)
    for start in range(0, n_rows, step):
        # Drop the previous chunk's block (d_block aliases it) before the GEMM allocates the next.
        block = d_block = None
        rows_slice = slice(start, min(start + step, n_rows))
        h = hidden[rows_slice]
        block = _block_logits(h, weight, bias)
        tgt = targets[rows_slice]
        if compute_stats:
            lse, ent, tz = rows.row_stats(block, tgt, inv_temperature)
            stats.lse[rows_slice], stats.entropy[rows_slice] = lse, ent
            stats.target_logit[rows_slice] = tz
        if not any(needs):
            continue
        d_block = rows.row_grad(
            block, tgt, stats.lse[rows_slice], stats.entropy[rows_slice],
            grad_logp[rows_slice], grad_entropy[rows_slice], inv_temperature, out=block,
        )
        if need_h:
            torch.mm(d_block, weight, out=d_hidden[rows_slice])
        if need_w:
            _accumulate_mm(d_weight, d_block.T, h)
        if need_b:
            d_bias += d_block.sum(0, dtype=torch.float32)
    grads = LinearGrads(
        d_hidden,
        d_weight.to(weight.dtype) if need_w else None,
        d_bias.to(bias.dtype) if need_b else None,
    )
    return stats, grads


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b with one rounding in all: a bf16 product per chunk would round
    every chunk's contribution before the sum. Low-precision operands are upcast chunk-wise."""
    acc.addmm_(a.float(), b.float())


def _row_targets(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = targets != ignore_index
    return torch.where(valid, targets, -1), valid


class _LinearLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, rows):
        row_targets, valid = _row_targets(targets, ignore_index)
        inv_t = 1.0 / temperature
        stats, _ = linear_pass(rows, hidden, weight, bias, row_targets, inv_t)
        ctx.save_for_backward(hidden, weight, bias, row_targets, valid, stats.lse, stats.entropy)
        ctx.inv_t, ctx.rows = inv_t, rows
        logp = torch.where(valid, stats.target_logit - stats.lse, 0.0)
        return logp, torch.where(valid, stats.entropy, 0.0)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, row_targets, valid, lse, entropy = ctx.saved_tensors
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # An unused output arrives as None; ignored rows get no gradient whatever flows in.
        g_lp = torch.where(valid, grad_logp.float(), zero) if grad_logp is not None else valid * zero
        g_h = torch.where(valid, grad_entropy.float(), zero) if grad_entropy is not None else valid * zero
        _, grads = linear_pass(
            ctx.rows, hidden, weight, bias, row_targets, ctx.inv_t,
            stats=RowStats(lse, entropy, None), grad_logp=g_lp, grad_entropy=g_h,
            needs=tuple(ctx.needs_input_grad[:3]),
        )
        return grads.hidden, grads.weight, grads.bias, None, None, None, None


class _WeightedLogprobLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, entropy_weights, temperature,
                ignore_index, rows, needs):
        row_targets, valid = _row_targets(targets, ignore_index)
        # loss = -Σ w·logp - Σ e·H, so the upstream weights of logp and H are -w and -e.
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        g_lp = torch.where(valid, -token_weights.float(), zero)
        g_h = torch.where(valid, -entropy_weights.float(), zero)
        stats, grads = linear_pass(
            rows, hidden, weight, bias, row_targets, 1.0 / temperature,
            grad_logp=g_lp, grad_entropy=g_h, needs=needs,
        )
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.has_grad, ctx.consumed = tuple(g is not None for g in grads), False
        logp = torch.where(valid, stats.target_logit - stats.lse, zero)
        return (g_lp * logp).sum() + (g_h * torch.where(valid, stats.entropy, zero)).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place (no second copy of a [V, H] gradient, no host sync to test for 1.0),
        # which is why a second backward through the same graph must be refused.
        if ctx.consumed:
            raise RuntimeError("weighted_logprob_loss: backward can run only once per forward")
        ctx.consumed = True
        stored = iter(ctx.saved_tensors)
        scaled = [next(stored).mul_(grad_loss) if has else None for has in ctx.has_grad]
        return (*scaled, None, None, None, None, None, None, None)


class _EntropyFromLogits(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, logits, temperature, rows):
        inv_t = 1.0 / temperature
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(lse)
        for part in _row_chunks(logits):
            lse[part], entropy[part], _ = rows.row_stats(logits[part], None, inv_t)
        ctx.save_for_backward(logits, lse, entropy)
        ctx.inv_t, ctx.rows = inv_t, rows
        return entropy

    @staticmethod
    @autocast_off
    def backward(ctx, grad_entropy):
        logits, lse, entropy = ctx.saved_tensors
        d_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        grad_entropy = grad_entropy.float()
        for part in _row_chunks(logits):
            ctx.rows.row_grad(logits[part], None, lse[part], entropy[part], None, grad_entropy[part],
                              ctx.inv_t, out=d_logits[part])
        return d_logits, None, None


def _row_chunks(logits: torch.Tensor) -> list[slice]:
    """Row slices of ``logits`` [R, V] sized like the linear path's chunks (bounded temporaries)."""
    n_rows, vocab = logits.shape
    step = chunk_rows(n_rows, vocab, logits.device)
    return [slice(start, start + step) for start in range(0, n_rows, step)]
