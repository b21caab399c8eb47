"""Per-token log-probs, softmax entropy and weighted log-prob losses from ``hidden @ weight.T``.

Standalone: imports torch (and triton for the ``triton`` backend) only. Math, for one token with
z = (W h + b) / T: ``logp(y) = z_y - lse(z)``, ``H = lse(z) - Σ_j p_j z_j`` (nats), accumulated
in float32 whatever the input dtype.

Backends: ``naive`` materialises the ``[N, V]`` logits (the reference); ``torch`` chunks tokens
so only a ``[chunk, V]`` block exists at a time; ``triton`` does the same with the vocab-wide
reductions and the logit gradient in Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``);
``auto`` picks ``triton`` on CUDA and ``torch`` elsewhere, and logs the choice once. No call
syncs with the host unless asked to: ``drop_ignored_rows=True`` removes the rows whose target is
``ignore_index`` before any GEMM (prompt tokens are often most of a batch) at the price of one
sync (the number of kept rows).

:func:`sample_tokens` (:mod:`.sample_rows`) is the decode step's sampler: token and entropy of each
row of ``[R, V]`` logits from one read, with seeded counter-based noise (no generator state).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
from types import ModuleType
from typing import NamedTuple

import torch

from gem_fast.choices import BACKENDS  # a light module: the CLI parsers read it before torch loads

from . import naive
from .logit_map import LogitMap
from .chunked import (
    DW_ACCUMULATIONS,
    ChunkPlan,
    _EntropyFromLogits,
    _LinearLogprobEntropy,
    _WeightedLogprobLoss,
    block_budget,
)

__all__ = [
    "BACKENDS",
    "DW_ACCUMULATIONS",
    "LogprobEntropyStats",
    "LossWithStats",
    "entropy_from_logits",
    "fused_logprob_entropy",
    "resolve_backend",
    "sample_tokens",
    "weighted_logprob_loss",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_log = logging.getLogger(__name__)
_auto_logged: set[str] = set()


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend that ``backend`` runs as on ``device`` (``auto`` -> ``triton`` on CUDA)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend != "auto":
        if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend: 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before gem_fast "
                f"is imported to run on {device.type}"
            )
        return backend
    chosen = "triton" if device.type == "cuda" else "torch"
    # Traced code cannot log (fullgraph compile): the first eager call logs the same choice.
    if device.type not in _auto_logged and not torch.compiler.is_compiling():
        _auto_logged.add(device.type)
        _log.info("gem_fast.kernels: backend 'auto' runs as %r on %s", chosen, device.type)
    return chosen


def _row_ops(backend: str) -> ModuleType:
    # Imported on first use so that `import gem_fast.kernels` never compiles or loads Triton.
    return importlib.import_module(f".{backend}_rows", __name__)


def _check_float(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype, got {tensor.dtype}")


def _check_same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name}: on {tensor.device}, expected {device} like hidden")


def _check_linear_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    logit_scale: float,
    logit_softcap: float | None,
) -> None:
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden: expected shape [..., H] with H > 0, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight: expected shape [V, {hidden.shape[-1]}] (hidden is {tuple(hidden.shape)}), "
            f"got {tuple(weight.shape)}"
        )
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets: expected an int64 tensor, got {getattr(targets, 'dtype', type(targets))}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
            f"got {tuple(targets.shape)}"
        )
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_same_device(hidden.device, weight=weight, targets=targets, bias=bias)
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale: must be a finite number > 0, got {logit_scale!r}")
    if logit_softcap is not None and not (isinstance(logit_softcap, (int, float)) and logit_softcap > 0):
        raise ValueError(f"logit_softcap: must be None or a number > 0, got {logit_softcap!r}")
    _check_targets_in_range(targets, weight.shape[0], ignore_index)


class _Linear(NamedTuple):
    """A validated call: backend, the GEMM operands (flattened, one dtype) and the logit map."""

    backend: str
    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    targets: torch.Tensor  # [N] int64
    logit_map: LogitMap


def _prepare_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    backend: str,
    logit_scale: float,
    logit_softcap: float | None,
    gemm_dtype: torch.dtype | None = None,
) -> _Linear:
    """Validate, resolve the backend, flatten and bring the GEMM operands to one dtype."""
    _check_linear_inputs(hidden, weight, targets, bias, temperature, ignore_index, logit_scale, logit_softcap)
    if gemm_dtype is not None and gemm_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"gemm_dtype: expected None or one of {_FLOAT_DTYPES}, got {gemm_dtype!r}")
    backend = resolve_backend(backend, hidden.device)
    flat_hidden, weight, bias = _gemm_operands(hidden.reshape(-1, hidden.shape[-1]), weight, bias, gemm_dtype)
    logit_map = LogitMap(1.0 / temperature, float(logit_scale), None if logit_softcap is None else float(logit_softcap))
    return _Linear(backend, flat_hidden, weight, bias, targets.reshape(-1).long(), logit_map)


def _check_targets_in_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if targets.is_meta:  # shapes only (memory and FLOP traces): no values to check
        return
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if targets.is_cuda:
        # A device-side assert instead of a host sync: the check must not stall the stream.
        torch._assert_async(~bad.any(), f"targets: values outside [0, {vocab}) that are not ignore_index")
    elif bad.any():
        first = targets[bad][0]
        raise ValueError(
            f"targets: {int(first)} is outside [0, {vocab}) and is not ignore_index={ignore_index}"
        )


def _gemm_operands(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One dtype for the logit GEMM: ``dtype`` where the caller names one. Else inside
    ``torch.autocast`` the autocast dtype, as ``nn.Linear`` would take: fp32 leaves (master
    weights) get fp32 gradient tensors of bf16-rounded values. Otherwise the widest of the inputs'
    dtypes (a bf16 hidden with an fp32 ``lm_head`` runs in fp32). The casts are differentiable, so
    each input's gradient comes back in its own dtype."""
    device_type = hidden.device.type
    if dtype is None and device_type != "meta" and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    elif dtype is None:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        dtype = dtype if bias is None else torch.promote_types(dtype, bias.dtype)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _valid_rows(flat_targets: torch.Tensor, ignore_index: int, drop: bool) -> torch.Tensor | None:
    """Indices [n_valid] int64 of the rows worth computing, or None for every row.

    An ignored row (prompt, padding) costs a full logit GEMM for an output of 0; finding the
    others is a host sync, so it happens only when the caller asks (``drop``).
    """
    if not drop:
        return None
    rows = (flat_targets != ignore_index).nonzero().squeeze(1)
    return None if rows.numel() == flat_targets.numel() else rows


def _take_rows(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return tensor if rows is None else tensor.index_select(0, rows)


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """Per-row values of the computed rows back to ``shape``, zeros on ignored rows (differentiable)."""
    if rows is None:
        return values.view(shape)
    return values.new_zeros(shape.numel()).index_copy(0, rows, values).view(shape)


def _chunk_plan(device: torch.device, block_bytes: int | None, dw_accumulation: str = "input") -> ChunkPlan:
    if dw_accumulation not in DW_ACCUMULATIONS:
        raise ValueError(f"dw_accumulation: expected one of {DW_ACCUMULATIONS}, got {dw_accumulation!r}")
    return ChunkPlan(block_budget(device, block_bytes), dw_accumulation)


def _check_token_weights(name: str, weights: torch.Tensor, targets: torch.Tensor) -> None:
    _check_float(name, weights)
    if tuple(weights.shape) != tuple(targets.shape):
        raise ValueError(f"{name}: expected shape {tuple(targets.shape)} like targets, got {tuple(weights.shape)}")
    _check_same_device(targets.device, **{name: weights})


class LogprobEntropyStats(NamedTuple):
    """:func:`fused_logprob_entropy` with ``return_row_stats=True``: log-prob and entropy, then row
    statistics of z from the same pass (shaped like targets, 0 on ignored rows, no gradient)."""

    logp: torch.Tensor  # float32, differentiable
    entropy: torch.Tensor  # float32, differentiable
    max_logit: torch.Tensor  # float32, max_j z_j
    argmax: torch.Tensor  # int64, the first j where z_j is the max (argmax == target: top-1)
    mean_logit: torch.Tensor  # float32, Σ_j z_j / V
    log_sum_sq_prob: torch.Tensor  # float32, log Σ_j p_j² (DPO's use_weighting)


def fused_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    drop_ignored_rows: bool = False,
    block_bytes: int | None = None,
    dw_accumulation: str = "input",
    return_row_stats: bool = False,
    gemm_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | LogprobEntropyStats:
    """Log-prob of ``targets`` and softmax entropy (nats) per token, without [N, V] logits.

    hidden [..., H], weight [V, H], targets [...] int64, bias [V] or None. The softmax sees
    z = softcap·tanh(scale·(W h + b) / softcap) / T (``logit_softcap`` None: scale·(W h + b) / T;
    Gemma-2/3's ``final_logit_softcapping``, Cohere's ``logit_scale``). Returns ``(logp,
    entropy)``, float32 of shape [...], differentiable w.r.t. hidden, weight and bias through
    both; rows whose target is ``ignore_index`` give 0 and pass no gradient. Mixed input dtypes
    run in the widest; each gradient comes back in its input's dtype.
    ``drop_ignored_rows``: skip those rows' GEMMs on the fused backends (one host sync).
    ``block_bytes``: bytes of one ``[chunk, V]`` logits block (default $GEM_FAST_BLOCK_BYTES,
    else 128 MiB on CUDA, 32 MiB elsewhere). ``dw_accumulation``: ``"input"`` adds dW up over
    chunks in the weight's dtype, ``"fp32"`` in an fp32 ``[V, H]`` accumulator (4·V·H bytes).
    ``return_row_stats``: a :class:`LogprobEntropyStats`, the row max, first argmax and mean of z
    and log Σ p² folded into the same pass (no extra GEMM). ``gemm_dtype``: the logit GEMM's operand dtype
    (e.g. float32 for TRL's ``cast_lm_head_to_fp32``), inside ``torch.autocast`` too; default as above.
    """
    call = _prepare_linear(hidden, weight, targets, bias, temperature, ignore_index, backend,
                           logit_scale, logit_softcap, gemm_dtype)
    plan = _chunk_plan(hidden.device, block_bytes, dw_accumulation)
    if call.backend == "naive":
        # An explicit gemm_dtype holds inside autocast too, which would recast naive's F.linear.
        with contextlib.nullcontext() if gemm_dtype is None else torch.autocast(hidden.device.type, enabled=False):
            results = naive.logprob_entropy(call.hidden, call.weight, call.targets, call.bias, call.logit_map,
                                            ignore_index, return_row_stats)
    else:
        rows = _valid_rows(call.targets, ignore_index, drop_ignored_rows)
        results = _LinearLogprobEntropy.apply(
            _take_rows(call.hidden, rows), call.weight, call.bias, _take_rows(call.targets, rows), call.logit_map,
            ignore_index, _row_ops(call.backend), plan, return_row_stats,
        )
        results = [_scatter_rows(t, rows, targets.shape) for t in results]
    results = [t.view(targets.shape) for t in results]
    if not return_row_stats:
        return results[0], results[1]
    logp, entropy, max_logit, argmax, logit_sum, log_sum_sq_prob = results
    return LogprobEntropyStats(logp, entropy, max_logit, argmax, logit_sum / weight.shape[0], log_sum_sq_prob)


class LossWithStats(NamedTuple):
    """:func:`weighted_logprob_loss` with ``return_stats=True``: the loss and, from the same pass,
    per-token log-probs and entropies (float32, shaped like targets, no gradient)."""

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor


def weighted_logprob_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    entropy_weights: torch.Tensor | None = None,
    backend: str = "auto",
    drop_ignored_rows: bool = False,
    block_bytes: int | None = None,
    dw_accumulation: str = "input",
    return_stats: bool = False,
) -> torch.Tensor | LossWithStats:
    """Scalar ``-Σ_t token_weights[t]·logp_t - Σ_t entropy_weights[t]·H_t`` over non-ignored tokens.

    Shapes and logits as :func:`fused_logprob_entropy`; token_weights / entropy_weights [...] like
    targets, treated as constants (advantages, SFT masks, entropy-bonus coefficients: no gradient
    flows into them). The fused backends produce the gradients during the forward pass, one logit
    GEMM per chunk, so ``backward`` only scales them. Returns a float32 0-dim tensor, or with
    ``return_stats`` a :class:`LossWithStats` (logging log-probs or entropy costs no second pass).
    ``drop_ignored_rows``, ``block_bytes``, ``dw_accumulation`` as in :func:`fused_logprob_entropy`.
    """
    call = _prepare_linear(hidden, weight, targets, bias, temperature, ignore_index, backend,
                           logit_scale, logit_softcap)
    plan = _chunk_plan(hidden.device, block_bytes, dw_accumulation)
    _check_token_weights("token_weights", token_weights, targets)
    if entropy_weights is None:
        entropy_weights = torch.zeros_like(token_weights, dtype=torch.float32)
    _check_token_weights("entropy_weights", entropy_weights, targets)
    w, e = token_weights.detach().reshape(-1), entropy_weights.detach().reshape(-1)
    if call.backend == "naive":
        logp, entropy = naive.logprob_entropy(call.hidden, call.weight, call.targets, call.bias, call.logit_map,
                                              ignore_index)
        loss = -(w.float() * logp).sum() - (e.float() * entropy).sum()
    else:
        grad_on = torch.is_grad_enabled()
        needs = tuple(grad_on and t is not None and t.requires_grad for t in (call.hidden, call.weight, call.bias))
        rows = _valid_rows(call.targets, ignore_index, drop_ignored_rows)
        loss, logp, entropy = _WeightedLogprobLoss.apply(
            _take_rows(call.hidden, rows), call.weight, call.bias, _take_rows(call.targets, rows),
            _take_rows(w, rows), _take_rows(e, rows), call.logit_map, ignore_index, _row_ops(call.backend),
            needs, plan,
        )
        logp, entropy = _scatter_rows(logp, rows, targets.shape), _scatter_rows(entropy, rows, targets.shape)
    if not return_stats:
        return loss
    return LossWithStats(loss, logp.detach().view(targets.shape), entropy.detach().view(targets.shape))


def entropy_from_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, backend: str = "auto", block_bytes: int | None = None
) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / T) over the last dim, one streaming pass per row.

    logits [..., V] (any float dtype) -> float32 [...]; differentiable. No probability tensor
    is allocated on the fused backends; ``triton`` is one launch over all rows, ``torch`` works
    in row chunks of ``block_bytes`` (as in :func:`fused_logprob_entropy`).
    """
    _check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape [..., V] with V > 0, got {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    backend = resolve_backend(backend, logits.device)
    budget = block_budget(logits.device, block_bytes)
    if backend == "naive":
        return naive.entropy_from_logits(logits, temperature)
    flat = logits.reshape(-1, logits.shape[-1])
    return _EntropyFromLogits.apply(flat, LogitMap(1.0 / temperature), _row_ops(backend), budget).view(
        logits.shape[:-1])


# Last: the sampling op resolves its backend with resolve_backend above.
from .sample_rows import sample_tokens  # noqa: E402
