"""pytest-benchmark suite over the same providers and calls as ``python -m bench.kernels``.

    pytest bench/ --benchmark-only

One shape per device (a GPU's is Llama-3-sized; the CPU's fits two cores). A provider that is
not installed, or that cannot run at this size, is a skip that names the reason.
"""

from __future__ import annotations

import pytest
import torch

from bench import kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOKENS, VOCAB, HIDDEN, DTYPE = (
    (8192, 128256, 4096, torch.bfloat16) if DEVICE.type == "cuda" else (256, 32000, 576, torch.float32)
)
CONFIG = kernels.make_config("full", DEVICE)
PROVIDERS = {p.name: p for p in kernels.build_providers(DEVICE)}
CASES = [
    pytest.param(op, mode, name, id=f"{op}-{mode}-{name}")
    for op in kernels.OPS
    for mode in kernels.MODES
    for name, provider in PROVIDERS.items()
    if op in provider.ops
]


@pytest.mark.parametrize(("op", "mode", "name"), CASES)
def test_kernel(benchmark, op: str, mode: str, name: str) -> None:
    provider = PROVIDERS[name]
    if not provider.installed():
        pytest.skip(f"{name}: not installed")
    reason = kernels.skip_reason(provider, op, TOKENS, VOCAB, CONFIG, DEVICE)
    if reason:
        pytest.skip(f"{name}: {reason}")
    args = kernels.make_inputs(op, TOKENS, VOCAB, HIDDEN, DTYPE, DEVICE)
    fn = provider.build(op)
    step = kernels.make_step(fn, op, mode, args)

    def call() -> None:
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # pytest-benchmark times on the host

    benchmark.pedantic(call, setup=lambda: kernels.drop_grads(op, args), rounds=5, warmup_rounds=1)
    errors = kernels.max_errors(fn, op, mode, args, kernels.reference(op, kernels.error_slice(op, args)))
    flops = (2 if mode == "fwd" else 6) * TOKENS * HIDDEN * VOCAB
    benchmark.extra_info.update(
        backend=provider.backend, tokens=TOKENS, vocab=VOCAB, hidden=HIDDEN, dtype=str(DTYPE),
        flops=flops if op != "entropy" else None, max_abs_err=max(errors.values()),
    )
