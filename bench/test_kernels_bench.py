"""pytest-benchmark suite over the same providers and calls as ``python -m bench.kernels``.

    pytest bench/ --benchmark-only

One shape per device (a GPU's is Llama-3-sized; the CPU's fits two cores). A provider that is
not installed, or that cannot run at this size, is a skip that names the reason.
"""

from __future__ import annotations

import pytest
import torch

from bench import kernels
from bench.kernel_ops import (
    FLOPS_PER_NHV, MODES, OPS, drop_grads, error_slice, make_inputs, make_step, max_errors, reference,
)
from bench.kernel_providers import build_providers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOKENS, VOCAB, HIDDEN, DTYPE = (
    (8192, 128256, 4096, torch.bfloat16) if DEVICE.type == "cuda" else (256, 32000, 576, torch.float32)
)
CONFIG = kernels.make_config("full", DEVICE)
# Largest abs error against the float64 reference a provider may have: fp32 results stay within
# 1e-2 (bench/results/cpu: <= 7e-4); bf16 rounds inputs and products to 8 mantissa bits.
MAX_ABS_ERR = 1e-2 if DTYPE == torch.float32 else 0.5
PROVIDERS = {p.name: p for p in build_providers(DEVICE)}
CASES = [
    pytest.param(op, mode, name, id=f"{op}-{mode}-{name}")
    for op in OPS
    for mode in MODES
    for name, provider in PROVIDERS.items()
    if op in provider.ops and mode in provider.modes
]


@pytest.mark.parametrize(("op", "mode", "name"), CASES)
def test_kernel(benchmark, op: str, mode: str, name: str) -> None:
    provider = PROVIDERS[name]
    if not provider.installed():
        pytest.skip(f"{name}: not installed")
    reason = kernels.skip_reason(provider, op, TOKENS, VOCAB, CONFIG, DEVICE)
    if reason:
        pytest.skip(f"{name}: {reason}")
    args = make_inputs(op, TOKENS, VOCAB, HIDDEN, DTYPE, DEVICE)
    fn = provider.build(op)
    step = make_step(fn, op, mode, args)

    def call() -> None:
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # pytest-benchmark times on the host

    benchmark.pedantic(call, setup=lambda: drop_grads(op, args), rounds=5, warmup_rounds=1)
    errors = max_errors(fn, op, mode, args, reference(op, error_slice(op, args)))
    assert errors and all(err <= MAX_ABS_ERR for err in errors.values()), errors
    flops = FLOPS_PER_NHV[op, mode] * TOKENS * HIDDEN * VOCAB if op != "entropy" else None
    benchmark.extra_info.update(
        backend=provider.backend, tokens=TOKENS, vocab=VOCAB, hidden=HIDDEN, dtype=str(DTYPE),
        flops=flops, max_abs_err=max(errors.values()),
    )
