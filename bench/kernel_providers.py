"""The implementations under test: gem_fast's backends, naive torch, torch.compile, Liger-Kernel, cut-cross-entropy.

Each :class:`Provider` builds, per op, a callable taking that op's inputs (see :mod:`bench.kernel_ops`).
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from gem_fast.kernels import entropy_from_logits, fused_logprob_entropy, resolve_backend, weighted_logprob_loss

from .common import package_version
from .kernel_ops import LINEAR_OPS, MODES, NAIVE_FNS, OPS


@dataclass(frozen=True)
class Provider:
    """One implementation under test. ``build(op)`` returns a callable taking the op's inputs."""

    name: str
    ops: tuple[str, ...]
    build: Callable[[str], Callable]
    backend: str  # what actually runs, for the tables
    requires: str | None = None  # importable module the provider needs
    triton: bool = False  # runs Triton kernels (interpreted on a CPU)
    jit: bool = False  # compiles on its first call at each shape: never error-checked at a second shape
    modes: tuple[str, ...] = MODES
    unavailable: str | None = None  # why this build of gem_fast cannot run it (a keyword it lacks)

    def installed(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def version(self) -> str | None:
        dist = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}
        return package_version(dist[self.requires]) if self.requires else None


def _missing_keywords(options: dict[str, object]) -> list[str]:
    """The option names that one of the linear gem_fast functions does not accept (the kernels change under us)."""
    fns = (fused_logprob_entropy, weighted_logprob_loss)
    return sorted({k for k in options for fn in fns if k not in inspect.signature(fn).parameters})


def gem_fast(backend: str, device: torch.device, *, name: str | None = None, **options: object) -> Provider:
    """gem_fast's three functions on ``backend``; ``options`` (e.g. ``dw_accumulation="fp32"``) go to the
    two linear ones, which are then the only ops, run forward+backward only (the options are about dW)."""
    used = resolve_backend(backend, device)
    fns = {
        "entropy": lambda logits: entropy_from_logits(logits, backend=backend),
        "logprob_entropy": lambda h, w, t, tw: fused_logprob_entropy(h, w, t, backend=backend, **options),
        "weighted_loss": lambda h, w, t, tw: weighted_logprob_loss(h, w, t, tw, backend=backend, **options),
    }
    missing = _missing_keywords(options)
    interpreted = used == "triton" and device.type != "cuda"
    return Provider(
        name=name or ("gem_fast" if backend == "auto" else f"gem_fast:{backend}"),
        ops=LINEAR_OPS if options else OPS,
        modes=("fwd+bwd",) if options else MODES,
        build=fns.__getitem__,
        backend=used + (" (interpreter)" if interpreted else "") + "".join(f", {k}={v}" for k, v in options.items()),
        triton=used == "triton",
        unavailable=f"gem_fast.kernels has no keyword {', '.join(missing)}" if missing else None,
    )


def _compiled(op: str) -> Callable:
    # A fresh compile per point, shapes static: one compile each, never a dynamic-shape graph and
    # never the recompile limit (dynamo keys its cache on the function's code, hence the reset).
    torch._dynamo.reset()
    return torch.compile(NAIVE_FNS[op], dynamic=False)


def _liger(op: str) -> Callable:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda h, w, t, tw: liger_fused_linear_cross_entropy(h, w, t, reduction="sum")


def _cce(op: str) -> Callable:
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w, t, tw: linear_cross_entropy(h, w, t, reduction="sum", impl="cce")


def build_providers(device: torch.device) -> list[Provider]:
    """gem_fast (auto, the other fused backend, auto with an fp32 dW accumulator), naive torch,
    torch.compile, Liger-Kernel, cut-cross-entropy."""
    other = "torch" if resolve_backend("auto", device) == "triton" else "triton"
    triton_label = "triton" if device.type == "cuda" else "triton (interpreter)"
    return [
        gem_fast("auto", device),
        gem_fast(other, device),
        gem_fast("auto", device, name="gem_fast:dw_fp32", dw_accumulation="fp32"),
        Provider("naive", OPS, NAIVE_FNS.__getitem__, "torch eager"),
        Provider("torch_compile", OPS, _compiled, "torch.compile (inductor, static shapes)", jit=True),
        Provider("liger", ("weighted_loss",), _liger, triton_label, requires="liger_kernel", triton=True),
        Provider("cce", ("weighted_loss",), _cce, triton_label, requires="cut_cross_entropy", triton=True),
    ]
