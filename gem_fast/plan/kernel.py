"""What a kernel call costs before it runs: extra memory term by term, GEMM FLOPs, row-pass traffic.

An analytic model of :mod:`gem_fast.kernels.chunked` at any shape (the GPU goal shape included),
checked on a CPU against an op-by-op trace of the same calls on meta tensors (every allocation,
the peak of live ones) and against the resident-memory probe (tests/test_plan_kernel.py).

"Extra" memory is what a call allocates beyond its inputs, their gradients and its outputs'
per-token vectors: for the fused backends, one ``[chunk, V]`` block in the input dtype, the torch
row passes' float32 temporaries (two per block, each no larger than the block), and with
``dw_accumulation="fp32"`` the ``[V, H]`` float32 accumulator. Per-token vectors (targets, masks,
row statistics, upstream weights, outputs) are bounded by ``PER_TOKEN_BYTES`` a token.
"""

from __future__ import annotations

from dataclasses import dataclass

from gem_fast.kernels.chunked import BLOCK_BYTES, DW_ACCUMULATIONS, chunk_rows

OPS = ("weighted_loss", "logprob_entropy", "entropy")
PLAN_BACKENDS = ("naive", "torch", "triton")
FP32 = 4
# Upper bound on the [N]-sized vectors of one call (int64 targets, bool masks, fp32 statistics,
# upstream weights and outputs): 8 + 1 + 1 + 10 fp32 vectors, rounded up.
PER_TOKEN_BYTES = 64


@dataclass(frozen=True)
class KernelPlan:
    """One op's forward+backward at one shape; bytes and FLOPs are totals for the call."""

    op: str
    backend: str
    tokens: int
    hidden: int
    vocab: int
    element_size: int
    chunk_rows: int
    terms: tuple[tuple[str, int], ...]  # extra memory at the peak, by name
    gemm_flops: int  # all GEMMs, forward and backward
    row_bytes: int | None  # bytes the row passes read and write (GEMM traffic not counted); None: not modelled

    def term(self, name: str) -> int:
        return dict(self.terms).get(name, 0)

    @property
    def extra_bytes(self) -> int:
        return sum(size for _, size in self.terms)

    def gemm_seconds(self, matmul_flops_per_s: float) -> float:
        return self.gemm_flops / matmul_flops_per_s

    def row_seconds(self, bytes_per_s: float) -> float | None:
        return None if self.row_bytes is None else self.row_bytes / bytes_per_s


def naive_loss_bytes(tokens: int, vocab: int, logits_element: int) -> int:
    """Peak bytes of the ``naive`` backend's log-prob/entropy/loss forward+backward.

    With L = tokens × vocab elements: forward holds the logits (``logits_element`` bytes each),
    then float32 z = logits / T, log-softmax, its exp p, the p > 0 mask (1 byte), log p with
    -inf zeroed and the product p·log p: logits + 5 fp32 + mask. Backward starts with log p, p,
    log p zeroed and the mask saved, adds the dense gather gradient and the product's two
    gradients: 6 fp32 + mask. The [V, H] weight gradient comes after all of these are freed.
    """
    elements = tokens * vocab
    forward = elements * (logits_element + 5 * FP32 + 1)
    backward = elements * (6 * FP32 + 1)
    return max(forward, backward)


def plan_kernel(
    op: str,
    tokens: int,
    hidden: int,
    vocab: int,
    *,
    element_size: int = 2,
    backend: str = "triton",
    device_type: str = "cuda",
    block_bytes: int | None = None,
    dw_accumulation: str = "input",
) -> KernelPlan:
    """Extra memory and work of ``op`` (one of OPS) forward+backward on inputs of ``element_size``
    bytes: hidden [tokens, hidden], weight [vocab, hidden] (``entropy``: logits [tokens, vocab]).
    ``block_bytes`` None: the device default of :data:`gem_fast.kernels.chunked.BLOCK_BYTES`."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    if backend not in PLAN_BACKENDS:
        raise ValueError(f"backend: expected one of {PLAN_BACKENDS}, got {backend!r}")
    if dw_accumulation not in DW_ACCUMULATIONS:
        raise ValueError(f"dw_accumulation: expected one of {DW_ACCUMULATIONS}, got {dw_accumulation!r}")
    budget = BLOCK_BYTES.get(device_type, BLOCK_BYTES["cpu"]) if block_bytes is None else block_bytes
    rows = chunk_rows(tokens, vocab, element_size, device_type, budget)
    elements = tokens * vocab
    per_token = ("per-token vectors", PER_TOKEN_BYTES * tokens)
    if backend == "naive":
        terms = (("[N, V] logits and their fp32 copies", naive_loss_bytes(tokens, vocab, element_size)), per_token)
    else:
        # entropy works on row slices of its input (views); the linear ops compute a block.
        block = 0 if op == "entropy" else rows * vocab * element_size
        # The Triton row kernels keep a row's state in registers: no temporaries.
        temporaries = 0 if backend == "triton" else 2 * _fp32_slice_rows(rows, element_size) * vocab * FP32
        terms = (("logits block", block), ("fp32 row temporaries", temporaries), per_token)
        if op != "entropy" and dw_accumulation == "fp32" and element_size < FP32:
            terms += (("fp32 dW accumulator", vocab * hidden * FP32),)
    # The naive path keeps its forward's logits for backward (6NHV); the fused log-prob/entropy
    # recomputes them (8NHV); the fused loss computes its gradients in the forward (6NHV).
    nhv = 0 if op == "entropy" else 6 if op == "weighted_loss" or backend == "naive" else 8
    gemm = nhv * tokens * hidden * vocab
    # Row passes over the logits: the loss reads each block twice (statistics, then the gradient
    # pass, ideally from L2) and writes it once; log-prob/entropy reads it in forward and reads and
    # writes it in backward; entropy reads the logits, then reads them and writes their gradient.
    # Modelled for the Triton rows only: the torch rows' and the naive path's fp32 elementwise
    # passes are many and depend on the torch version.
    row_bytes = 3 * elements * element_size if backend == "triton" else None
    return KernelPlan(op, backend, tokens, hidden, vocab, element_size, rows, terms, gemm, row_bytes)


def _fp32_slice_rows(rows: int, element_size: int) -> int:
    # gem_fast.kernels.torch_rows works on row slices whose fp32 copy is no larger than the block.
    return max(1, rows * element_size // FP32)
