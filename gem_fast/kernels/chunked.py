"""Token-chunked linear + vocab-row passes and their autograd Functions (``torch``/``triton``).

The logits of ``chunk`` tokens, a ``[chunk, V]`` block in the input dtype, exist one chunk at a
time: the GEMMs go to the BLAS (cuBLAS on a GPU) with operands in the input dtype (tensor cores
for bf16/fp16; the GEMM accumulates in fp32 inside), and the vocab-wide reductions and the logit
gradient to a row-ops module (:mod:`.torch_rows` or :mod:`.triton_rows`), which overwrites the
block with its gradient in place. Nothing of size ``[N, V]`` is allocated.

FLOPs with hidden N×H and weight V×H: ``_LinearLogprobEntropy`` spends 2NHV forward and 6NHV
backward (it recomputes the logits); ``_WeightedLogprobLoss`` knows its per-token weights before
the forward and spends 6NHV in the forward, leaving ``backward`` a scale of stored gradients.

dW adds up over token chunks. ``dw_accumulation="input"`` (default) adds each chunk's product
into a dW of the weight's dtype (``addmm`` into itself, as Liger-Kernel does): one rounding per
chunk, no extra memory. ``"fp32"`` keeps an fp32 ``[V, H]`` accumulator fed by the same
low-precision GEMMs (``out_dtype=float32``: into the accumulator, or where this torch refuses an
fp32 addend, a block-sized fp32 product per vocab slab) and rounds once at the end: 4·V·H more bytes.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType
from typing import Callable, NamedTuple

import torch

from .logit_map import LogitMap, RowExtras

# Bytes of one chunk's [rows, V] logits block, counted in the block's own dtype.
BLOCK_BYTES = {"cuda": 128 * 2**20, "cpu": 32 * 2**20}
BLOCK_BYTES_ENV = "GEM_FAST_BLOCK_BYTES"
# Chunk rows are a multiple of this where the budget allows (a GEMM tile on CUDA). Tests lower it.
ROW_MULTIPLE = {"cuda": 128}
DW_ACCUMULATIONS = ("input", "fp32")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_log = logging.getLogger(__name__)


class ChunkPlan(NamedTuple):
    """How a call cuts its work: the block budget in bytes and how dW adds up over chunks."""

    block_bytes: int
    dw_accumulation: str = "input"


def block_budget(device: torch.device, block_bytes: int | None = None) -> int:
    """Bytes of one logits block: ``block_bytes`` if given, else $GEM_FAST_BLOCK_BYTES, else the
    device default (128 MiB on CUDA, 32 MiB elsewhere)."""
    if block_bytes is None:
        raw = os.environ.get(BLOCK_BYTES_ENV)
        if raw is None:
            return BLOCK_BYTES.get(device.type, BLOCK_BYTES["cpu"])
        try:
            block_bytes = int(raw)
        except ValueError:
            raise ValueError(f"{BLOCK_BYTES_ENV}: expected a number of bytes, got {raw!r}") from None
        name = BLOCK_BYTES_ENV
    else:
        name = "block_bytes"
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes <= 0:
        raise ValueError(f"{name}: expected a positive number of bytes, got {block_bytes!r}")
    return block_bytes


def chunk_rows(n_rows: int, vocab: int, element_size: int, device_type: str, block_bytes: int) -> int:
    """Tokens per chunk so that a ``[chunk, vocab]`` block of ``element_size``-byte elements fits
    ``block_bytes``, rounded down to the device's row multiple when at least one multiple fits."""
    rows = block_bytes // (element_size * vocab)
    multiple = ROW_MULTIPLE.get(device_type, 1)
    if rows >= multiple:
        rows -= rows % multiple
    return max(1, min(n_rows, rows))


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


@functools.cache
def _fp32_output_gemm(device_type: str, dtype: torch.dtype) -> str | None:
    """How this torch writes a ``dtype`` GEMM's product to float32 here: ``"addmm"`` (into an fp32
    addend: recent CUDA builds), ``"mm"`` (a fresh fp32 product only: earlier CUDA builds want the
    addend in the operands' dtype) or None (the CPU has neither). Probed once on 1x1 GEMMs (no host
    sync: a refusal is raised before any launch)."""
    device = torch.device(device_type)
    acc = torch.zeros(1, 1, device=device)
    one = torch.ones(1, 1, dtype=dtype, device=device)
    for kind, gemm in (("addmm", lambda: torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)),
                       ("mm", lambda: torch.mm(one, one, out_dtype=torch.float32))):
        try:
            gemm()
            return kind
        except (RuntimeError, NotImplementedError, TypeError):
            continue
    return None


@functools.cache
def _warn_upcast(device_type: str, dtype: torch.dtype) -> None:
    _log.warning("gem_fast.kernels: dw_accumulation='fp32' on %s upcasts each chunk's dW operands to "
                 "fp32: this torch has no float32-output GEMM for %s here", device_type, dtype)


class _WeightGrad:
    """dW = Σ_chunks d_block.T @ h, added up as ``dw_accumulation`` says (see the module doc)."""

    def __init__(self, weight: torch.Tensor, dw_accumulation: str, block_bytes: int):
        low = weight.dtype in _LOW_PRECISION
        self.fp32 = dw_accumulation == "fp32" and low
        self.dtype = weight.dtype
        self.sum = torch.zeros(weight.shape, dtype=torch.float32 if self.fp32 else weight.dtype,
                               device=weight.device)
        self.gemm = _fp32_output_gemm(weight.device.type, weight.dtype) if self.fp32 else None
        # With a fresh fp32 product only, it is made a vocab slab at a time, no larger than a block.
        self.slab_rows = max(1, block_bytes // (4 * weight.shape[1]))
        if self.fp32 and self.gemm is None:
            _warn_upcast(weight.device.type, weight.dtype)

    def add(self, d_block_t: torch.Tensor, h: torch.Tensor) -> None:
        if not self.fp32:
            self.sum.addmm_(d_block_t, h)
        elif self.gemm == "addmm":
            torch.addmm(self.sum, d_block_t, h, out_dtype=torch.float32, out=self.sum)
        elif self.gemm == "mm":
            for start in range(0, self.sum.shape[0], self.slab_rows):
                slab = slice(start, start + self.slab_rows)
                self.sum[slab].add_(torch.mm(d_block_t[slab], h, out_dtype=torch.float32))
        else:
            self.sum.addmm_(d_block_t.float(), h.float())

    def result(self) -> torch.Tensor:
        return self.sum.to(self.dtype) if self.fp32 else self.sum


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
    logit_map: LogitMap,
    plan: ChunkPlan,
    *,
    stats: RowStats | None = None,
    extras: RowExtras | None = None,
    grad_logp: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
    needs: tuple[bool, bool, bool] = (False, False, False),
) -> tuple[RowStats, LinearGrads]:
    """One pass over token chunks of ``hidden @ weight.T + bias``; each block is computed once.

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] (outside [0, V) = no target).
    ``stats`` None: computed here. ``needs`` = which of (hidden, weight, bias) get gradients for
    per-token upstream weights ``grad_logp``, ``grad_entropy`` ([N] float32; zero on ignored rows).
    With both ``stats`` None and gradients needed, the row module computes the statistics and
    the logit gradient of a block in one call (one kernel on the Triton backend). ``extras``
    ([N] tensors, statistics pass only): filled with each row's max, first argmax, sum of z and
    Σ e^{2(z - max)}.
    """
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    compute_stats = stats is None
    if extras is not None and (not compute_stats or any(needs)):
        raise ValueError("extras: filled by the statistics pass only (stats None, no gradients)")
    if compute_stats:
        stats = RowStats(*(torch.empty(n_rows, dtype=torch.float32, device=device) for _ in range(3)))
    need_h, need_w, need_b = needs
    d_hidden = torch.empty_like(hidden) if need_h else None
    d_weight = _WeightGrad(weight, plan.dw_accumulation, plan.block_bytes) if need_w else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
    step = chunk_rows(n_rows, vocab, hidden.element_size(), device.type, plan.block_bytes)
    for start in range(0, n_rows, step):
        # Drop the previous chunk's block (d_block aliases it) before the GEMM allocates the next.
        block = d_block = None
        part = slice(start, min(start + step, n_rows))
        h = hidden[part]
        block = _block_logits(h, weight, bias)
        tgt = targets[part]
        if not any(needs):
            stats.lse[part], stats.entropy[part], stats.target_logit[part] = rows.row_stats(
                block, tgt, logit_map, None if extras is None else extras.rows(part))
            continue
        if compute_stats:
            (stats.lse[part], stats.entropy[part], stats.target_logit[part]), d_block = rows.row_stats_and_grad(
                block, tgt, grad_logp[part], grad_entropy[part], logit_map, out=block)
        else:
            d_block = rows.row_grad(block, tgt, stats.lse[part], stats.entropy[part], grad_logp[part],
                                    grad_entropy[part], logit_map, out=block)
        if need_h:
            torch.mm(d_block, weight, out=d_hidden[part])
        if need_w:
            d_weight.add(d_block.T, h)
        if need_b:
            d_bias += d_block.sum(0, dtype=torch.float32)
    grads = LinearGrads(
        d_hidden,
        d_weight.result() if need_w else None,
        d_bias.to(bias.dtype) if need_b else None,
    )
    return stats, grads


def _row_targets(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = targets != ignore_index
    return torch.where(valid, targets, -1), valid


class _LinearLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, logit_map, ignore_index, rows, plan, with_extras=False):
        """-> (logp [N], entropy [N]), then with ``with_extras`` each row's max z, first argmax,
        Σ z and log Σ p² (no gradient); every output is 0 on ignored rows."""
        row_targets, valid = _row_targets(targets, ignore_index)
        extras = RowExtras.empty(hidden.shape[0], hidden.device) if with_extras else None
        stats, _ = linear_pass(rows, hidden, weight, bias, row_targets, logit_map, plan, extras=extras)
        ctx.save_for_backward(hidden, weight, bias, row_targets, valid, stats.lse, stats.entropy)
        ctx.logit_map, ctx.rows, ctx.plan = logit_map, rows, plan
        logp = torch.where(valid, stats.target_logit - stats.lse, 0.0)
        if extras is None:
            return logp, torch.where(valid, stats.entropy, 0.0)
        # log Σ p² = log Σ e^{2(z-m)} - 2 log Σ e^{z-m}, and log Σ e^{z-m} = lse - m.
        extras = extras._replace(sum_sq_exp=extras.sum_sq_exp.log() - 2 * (stats.lse - extras.max_logit))
        extras = [torch.where(valid, t, 0) for t in extras]
        ctx.mark_non_differentiable(*extras)
        return logp, torch.where(valid, stats.entropy, 0.0), *extras

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_extras):
        hidden, weight, bias, row_targets, valid, lse, entropy = ctx.saved_tensors
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # An unused output arrives as None; ignored rows get no gradient whatever flows in.
        g_lp = torch.where(valid, grad_logp.float(), zero) if grad_logp is not None else valid * zero
        g_h = torch.where(valid, grad_entropy.float(), zero) if grad_entropy is not None else valid * zero
        _, grads = linear_pass(
            ctx.rows, hidden, weight, bias, row_targets, ctx.logit_map, ctx.plan,
            stats=RowStats(lse, entropy, None), grad_logp=g_lp, grad_entropy=g_h,
            needs=tuple(ctx.needs_input_grad[:3]),
        )
        return grads.hidden, grads.weight, grads.bias, None, None, None, None, None, None


class _WeightedLogprobLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, entropy_weights, logit_map,
                ignore_index, rows, needs, plan):
        """-> (loss, logp [N], entropy [N]); only the loss is differentiable."""
        row_targets, valid = _row_targets(targets, ignore_index)
        # loss = -Σ w·logp - Σ e·H, so the upstream weights of logp and H are -w and -e.
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        g_lp = torch.where(valid, -token_weights.float(), zero)
        g_h = torch.where(valid, -entropy_weights.float(), zero)
        stats, grads = linear_pass(
            rows, hidden, weight, bias, row_targets, logit_map, plan,
            grad_logp=g_lp, grad_entropy=g_h, needs=needs,
        )
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.has_grad, ctx.consumed = tuple(g is not None for g in grads), False
        logp = torch.where(valid, stats.target_logit - stats.lse, zero)
        entropy = torch.where(valid, stats.entropy, zero)
        ctx.mark_non_differentiable(logp, entropy)
        return (g_lp * logp).sum() + (g_h * entropy).sum(), logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        # Scaled in place (no second copy of a [V, H] gradient, no host sync to test for 1.0),
        # which is why a second backward through the same graph must be refused.
        if ctx.consumed:
            raise RuntimeError("weighted_logprob_loss: backward can run only once per forward")
        ctx.consumed = True
        stored = iter(ctx.saved_tensors)
        scaled = [next(stored).mul_(grad_loss) if has else None for has in ctx.has_grad]
        return (*scaled, None, None, None, None, None, None, None, None)


class _EntropyFromLogits(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, logits, logit_map, rows, block_bytes):
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(lse)
        for part in _row_chunks(logits, rows, block_bytes):
            lse[part], entropy[part], _ = rows.row_stats(logits[part], None, logit_map)
        ctx.save_for_backward(logits, lse, entropy)
        ctx.logit_map, ctx.rows, ctx.block_bytes = logit_map, rows, block_bytes
        return entropy

    @staticmethod
    @autocast_off
    def backward(ctx, grad_entropy):
        logits, lse, entropy = ctx.saved_tensors
        d_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        grad_entropy = grad_entropy.float()
        for part in _row_chunks(logits, ctx.rows, ctx.block_bytes):
            ctx.rows.row_grad(logits[part], None, lse[part], entropy[part], None, grad_entropy[part],
                              ctx.logit_map, out=d_logits[part])
        return d_logits, None, None, None


def _row_chunks(logits: torch.Tensor, rows: ModuleType, block_bytes: int) -> list[slice]:
    """Row slices of ``logits`` [R, V]: one launch over all rows where the row module streams the
    vocabulary in registers (Triton), block-sized slices where it allocates per-row temporaries."""
    n_rows, vocab = logits.shape
    if rows.STREAMS_ROWS:
        return [slice(0, n_rows)]
    step = chunk_rows(n_rows, vocab, logits.element_size(), logits.device.type, block_bytes)
    return [slice(start, start + step) for start in range(0, n_rows, step)]
