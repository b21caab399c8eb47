"""The kernels' GPU-path rules, checked on a CPU: GEMM operand dtypes, FLOPs and every temporary,
traced op by op at the goal shape on meta tensors, and the memory model of gem_fast.plan.kernel
against that trace and against the resident-memory probe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gem_fast.kernels import chunked, entropy_from_logits, fused_logprob_entropy, weighted_logprob_loss
from gem_fast.plan.kernel import PER_TOKEN_BYTES, plan_kernel
from op_trace import OpTrace

GOAL = (32768, 4096, 128256)  # tokens, hidden, Llama-3 vocab
BLOCK = 128 * 2**20
FLOPS_PER_NHV = {"weighted_loss": 6, "logprob_entropy": 8}
PROBE = Path(__file__).with_name("peak_rss_probe.py")


def run_op(op: str, hidden, weight, targets, **kwargs) -> tuple[torch.Tensor, ...]:
    """Forward and backward of ``op``; returns the gradients of hidden and weight."""
    upstream = torch.ones(targets.shape, device=targets.device)
    if op == "weighted_loss":
        loss = weighted_logprob_loss(hidden, weight, targets, upstream, **kwargs)
        return torch.autograd.grad(loss, (hidden, weight))
    logp, entropy = fused_logprob_entropy(hidden, weight, targets, **kwargs)
    return torch.autograd.grad((logp, entropy), (hidden, weight), (upstream, upstream))


def linear_inputs(n: int, h: int, v: int, device: str, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    make = (lambda *shape: torch.empty(*shape, dtype=dtype, device="meta")) if device == "meta" else (
        lambda *shape: (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dtype))
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    return make(n, h).requires_grad_(), make(v, h).requires_grad_(), targets


@pytest.mark.parametrize("dw_accumulation", ["input", "fp32"])
@pytest.mark.parametrize("op", ["weighted_loss", "logprob_entropy"])
def test_torch_backend_at_the_goal_shape_keeps_the_gpu_rules(monkeypatch, op, dw_accumulation):
    """bf16 inputs at N=32768, H=4096, V=128256 with the CUDA block budget and row tiles."""
    monkeypatch.setitem(chunked.ROW_MULTIPLE, "meta", chunked.ROW_MULTIPLE["cuda"])
    n, h, v = GOAL
    hidden, weight, targets = linear_inputs(n, h, v, "meta")
    gradients = [(n, h), (v, h)]
    with OpTrace(uncounted=lambda a: a.shape in gradients and a.dtype == torch.bfloat16) as trace:
        grads = run_op(op, hidden, weight, targets, backend="torch", block_bytes=BLOCK,
                       dw_accumulation=dw_accumulation)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16]
    # Tensor cores: every GEMM reads bf16 operands (the fp32 accumulator is written by the GEMM).
    assert {g.dtypes for g in trace.gemms} == {(torch.bfloat16, torch.bfloat16)}
    assert trace.gemm_flops == pytest.approx(FLOPS_PER_NHV[op] * n * h * v, rel=0.03)
    # Chunks of 512 rows (4 GEMM tiles of 128): 523 bf16 rows fit the 128 MiB budget.
    assert max(g.flops for g in trace.gemms) == 2 * 512 * h * v
    weight_shaped_fp32 = [a for a in trace.allocations
                          if a.dtype == torch.float32 and h in a.shape and max(a.shape) >= v // 8]
    assert len(weight_shaped_fp32) == (1 if dw_accumulation == "fp32" else 0)
    assert all(torch.Size(a.shape).numel() < n * v for a in trace.allocations)
    rest = [a for a in trace.allocations if a not in weight_shaped_fp32]
    assert all(a.nbytes <= BLOCK for a in rest if a.dtype == torch.float32 and v in a.shape)
    large = [a for a in rest if a.nbytes > BLOCK]
    assert all(a.shape in gradients and a.dtype == torch.bfloat16 for a in large), large
    # The memory model: extra bytes at the peak, beyond the two gradients the call returns.
    plan = plan_kernel(op, n, h, v, element_size=2, backend="torch", device_type="cuda",
                       block_bytes=BLOCK, dw_accumulation=dw_accumulation)
    assert plan.extra_bytes - PER_TOKEN_BYTES * n <= trace.peak_bytes <= plan.extra_bytes
    assert plan.chunk_rows == 512 and plan.gemm_flops == FLOPS_PER_NHV[op] * n * h * v


@pytest.mark.parametrize("op", ["weighted_loss", "logprob_entropy"])
def test_triton_backend_allocates_nothing_vocab_wide_in_float32(monkeypatch, op):
    """The Triton row kernels hold a row in registers: the only [*, V] tensor is the bf16 block."""
    import gem_fast.kernels.triton_rows as triton_rows

    monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 64)
    n, h, v = 40, 16, 300
    hidden, weight, targets = linear_inputs(n, h, v, "cpu")
    with OpTrace(uncounted=lambda a: a.shape in [(n, h), (v, h)] and a.dtype == torch.bfloat16) as trace:
        run_op(op, hidden, weight, targets, backend="triton", block_bytes=8 * v * 2)
    assert {g.dtypes for g in trace.gemms} == {(torch.bfloat16, torch.bfloat16)}
    assert trace.gemm_flops == FLOPS_PER_NHV[op] * n * h * v
    vocab_wide = [a for a in trace.allocations if v in a.shape and a.shape != (v, h)]
    assert vocab_wide and all(a.shape == (8, v) and a.dtype == torch.bfloat16 for a in vocab_wide), vocab_wide
    plan = plan_kernel(op, n, h, v, element_size=2, backend="triton", device_type="cpu", block_bytes=8 * v * 2)
    assert trace.peak_bytes <= plan.extra_bytes


def test_weighted_loss_on_triton_is_one_kernel_per_chunk_and_entropy_one_launch(monkeypatch):
    import gem_fast.kernels.triton_rows as triton_rows

    launches = []
    for name in ("_row_stats_kernel", "_row_grad_kernel", "_row_stats_and_grad_kernel"):
        kernel = getattr(triton_rows, name)
        monkeypatch.setattr(triton_rows, name, type("Counted", (), {
            "__getitem__": lambda self, grid, name=name, kernel=kernel: launches.append(name) or kernel[grid]})())
    n, h, v = 40, 16, 300
    hidden, weight, targets = linear_inputs(n, h, v, "cpu")
    run_op("weighted_loss", hidden, weight, targets, backend="triton", block_bytes=8 * v * 2)
    assert launches == ["_row_stats_and_grad_kernel"] * 5
    launches.clear()
    logits = torch.randn(n, v, requires_grad=True)
    entropy_from_logits(logits, backend="triton", block_bytes=8 * v * 4).sum().backward()
    assert launches == ["_row_stats_kernel", "_row_grad_kernel"]


@pytest.mark.slow
def test_plan_matches_the_resident_memory_probe():
    """Fresh process, fp32 on the CPU, SmolLM2's sizes: the model's extra bytes plus the two
    gradients the call returns (the probe pre-allocates .grad, autograd adds ours into it),
    against peak RSS with glibc's mmap threshold fixed so freed blocks leave the resident set."""
    n, h, v = 4096, 576, 49152
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, str(PROBE), "torch", str(n), str(h), str(v)],
                         check=True, capture_output=True, text=True, env=env)
    measured = int(out.stdout.strip().splitlines()[-1])
    plan = plan_kernel("logprob_entropy", n, h, v, element_size=4, backend="torch", device_type="cpu")
    predicted = plan.extra_bytes + (n + v) * h * 4
    # Above the model: the BLAS's GEMM workspace and page granularity (measured 1.08x).
    assert predicted * 0.97 <= measured <= predicted * 1.25, (measured, predicted)


def test_fp32_dw_without_an_fp32_addend_keeps_bf16_operands_and_block_sized_products(monkeypatch):
    """Where torch refuses addmm(fp32 acc, bf16, bf16, out_dtype=fp32) (earlier CUDA builds), the
    accumulator is fed fp32 products of bf16 operands one vocab slab at a time, never an upcast."""
    monkeypatch.setattr(chunked, "_fp32_output_gemm", lambda device_type, dtype: "mm")
    monkeypatch.setitem(chunked.ROW_MULTIPLE, "meta", chunked.ROW_MULTIPLE["cuda"])
    n, h, v = GOAL
    hidden, weight, targets = linear_inputs(n, h, v, "meta")
    with OpTrace() as trace:
        run_op("weighted_loss", hidden, weight, targets, backend="torch", block_bytes=BLOCK, dw_accumulation="fp32")
    assert {g.dtypes for g in trace.gemms} == {(torch.bfloat16, torch.bfloat16)}
    assert trace.gemm_flops == 6 * n * h * v
    fp32 = [a for a in trace.allocations if a.dtype == torch.float32 and a.shape != (v, h)]
    assert all(a.nbytes <= BLOCK for a in fp32)
    assert any(a.op == "mm" and a.shape[1] == h for a in fp32)  # the slab products
