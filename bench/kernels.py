"""Benchmark gem_fast's vocab kernels against naive torch, torch.compile, Liger-Kernel and CCE.

    python -m bench.kernels            # full sweep sized for the device present (GPU or CPU)
    python -m bench.kernels --quick    # seconds: tiny shapes, checks the harness and the JSON

Three operations, each forward (under ``no_grad``) and forward+backward:

* ``entropy``          entropy_from_logits on ``[N, V]`` logits;
* ``logprob_entropy``  fused_logprob_entropy from ``hidden [N, H]`` and ``weight [V, H]``;
* ``weighted_loss``    weighted_logprob_loss with unit token weights, which makes it the summed
  cross-entropy that Liger-Kernel's fused linear cross entropy and cut-cross-entropy compute,
  so all providers produce the same scalar.

Every point records the median time, peak memory beyond inputs, weights and the gradients the
call returns, throughput (FLOP/s for the linear ops, counting 2NHV forward and 6NHV
forward+backward; bytes/s for entropy) as a fraction of a matmul / copy rate probed in the same
run, and the max abs error against float64 on a slice of tokens. Results go to
``<out>/<device>/``: ``results.json``, ``results.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

# Triton kernels (Liger's, CCE's, gem_fast's triton backend) can only run on a CPU through the
# interpreter, which must be chosen before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gem_fast.kernels import (  # noqa: E402
    entropy_from_logits,
    fused_logprob_entropy,
    resolve_backend,
    weighted_logprob_loss,
)

from .common import (  # noqa: E402
    PeakMemory,
    RepeatPolicy,
    device_name,
    environment,
    measure,
    median_seconds,
    package_version,
    results_dir,
    status_counts,
    write_results,
)

OPS = ("entropy", "logprob_entropy", "weighted_loss")
MODES = ("fwd", "fwd+bwd")
STATUSES = ("ok", "not installed", "skipped", "error")
REQUIRED_ROW_FIELDS = (
    "op", "mode", "tokens", "vocab", "hidden", "dtype", "provider", "backend", "status",
    "time_ms", "repeats", "peak_extra_bytes", "throughput", "throughput_unit",
    "fraction_of_peak", "max_abs_err", "device",
)
# Triton on a CPU runs in the interpreter, thousands of times slower than compiled code.
INTERPRETER_MAX_TOKENS, INTERPRETER_MAX_VOCAB = 64, 2048
ERR_TOKENS = 64  # tokens in the float64 error check
# On the CPU, a naive point whose logits copies would pass this is skipped, not run into swap.
CPU_NAIVE_CAP_BYTES = 12 * 2**30
NAIVE_LOGIT_COPIES = 6  # [N, V] float32 tensors alive at once in naive forward+backward


# ---------------------------------------------------------------------------------------------
# Plain-torch formulations: the "naive" peer, its torch.compile'd twin and (in float64) the
# reference. Logits are upcast as users do before a softmax; float64 stays float64.

def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def torch_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy with softmax + log_softmax + sum over the full logits."""
    z = _upcast(logits)
    return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)


def torch_logprob_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-prob and entropy per token from the full ``[N, V]`` logits."""
    logp = torch.log_softmax(_upcast(hidden @ weight.T), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy


def torch_weighted_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor
) -> torch.Tensor:
    """``-Σ w_t logp_t`` from the full ``[N, V]`` logits."""
    logp = torch.log_softmax(_upcast(hidden @ weight.T), -1).gather(-1, targets[:, None]).squeeze(-1)
    return -(token_weights * logp).sum()


NAIVE_FNS: dict[str, Callable] = {
    "entropy": torch_entropy,
    "logprob_entropy": torch_logprob_entropy,
    "weighted_loss": torch_weighted_loss,
}


# ---------------------------------------------------------------------------------------------
# Providers


@dataclass(frozen=True)
class Provider:
    """One implementation under test. ``build(op)`` returns a callable taking the op's inputs."""

    name: str
    ops: tuple[str, ...]
    build: Callable[[str], Callable]
    backend: str  # what actually runs, for the tables
    requires: str | None = None  # importable module the provider needs
    triton: bool = False  # runs Triton kernels (interpreted on a CPU)
    jit: bool = False  # compiles on first call: always warmed up before timing

    def installed(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def version(self) -> str | None:
        dist = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}
        return package_version(dist.get(self.requires, "gem_fast")) if self.requires else None


def _gem_fast(backend: str, device: torch.device) -> Provider:
    used = resolve_backend(backend, device)
    fns = {
        "entropy": lambda logits: entropy_from_logits(logits, backend=backend),
        "logprob_entropy": lambda h, w, t, tw: fused_logprob_entropy(h, w, t, backend=backend),
        "weighted_loss": lambda h, w, t, tw: weighted_logprob_loss(h, w, t, tw, backend=backend),
    }
    interpreted = used == "triton" and device.type != "cuda"
    return Provider(
        name="gem_fast" if backend == "auto" else f"gem_fast:{backend}",
        ops=OPS,
        build=fns.__getitem__,
        backend=used + (" (interpreter)" if interpreted else ""),
        triton=used == "triton",
    )


@functools.cache
def _compiled(op: str) -> Callable:
    # One compiled function per op for the whole run, as a user would hold it: dynamo
    # specialises on the first shape and goes dynamic on the next, not recompiling per point.
    return torch.compile(NAIVE_FNS[op])


def _liger(op: str) -> Callable:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda h, w, t, tw: liger_fused_linear_cross_entropy(h, w, t, reduction="sum")


def _cce(op: str) -> Callable:
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w, t, tw: linear_cross_entropy(h, w, t, reduction="sum", impl="cce")


def build_providers(device: torch.device) -> list[Provider]:
    """gem_fast (auto and the other fused backend), naive torch, torch.compile, Liger, CCE."""
    other = "torch" if resolve_backend("auto", device) == "triton" else "triton"
    triton_label = "triton" if device.type == "cuda" else "triton (interpreter)"
    return [
        _gem_fast("auto", device),
        _gem_fast(other, device),
        Provider("naive", OPS, NAIVE_FNS.__getitem__, "torch eager"),
        Provider("torch_compile", OPS, _compiled, "torch.compile (inductor)", jit=True),
        Provider("liger", ("weighted_loss",), _liger, triton_label, requires="liger_kernel", triton=True),
        Provider("cce", ("weighted_loss",), _cce, triton_label, requires="cut_cross_entropy", triton=True),
    ]


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Config:
    """A sweep: token counts at a fixed vocab and vocab sizes at a fixed token count."""

    name: str
    hidden: int
    dtype: torch.dtype
    vocab_sweep: tuple[int, tuple[int, ...]]  # (tokens, vocab sizes)
    token_sweep: tuple[int, tuple[int, ...]]  # (vocab, token counts)
    extra_shapes: tuple[tuple[int, int], ...]  # (tokens, vocab) outside the two sweeps
    policy: RepeatPolicy
    skip_compile: str | None = None  # reason, when torch.compile is not run in this mode
    probe_matmul: tuple[int, int, int] = (8192, 8192, 8192)
    probe_copy_bytes: int = 2**30

    def shapes(self) -> list[tuple[int, int]]:
        n_fixed, vocabs = self.vocab_sweep
        v_fixed, tokens = self.token_sweep
        every = {(n_fixed, v) for v in vocabs} | {(n, v_fixed) for n in tokens} | set(self.extra_shapes)
        return sorted(every, key=lambda s: (s[0] * s[1], s))


def make_config(mode: str, device: torch.device) -> Config:
    """``quick``: tiny shapes for CI; ``full``: the sweep sized for ``device``."""
    if mode == "quick":
        return Config(
            "quick", hidden=64, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16,
            vocab_sweep=(16, (256, 512)), token_sweep=(512, (8, 16)), extra_shapes=(),
            policy=RepeatPolicy(warmup=0 if device.type == "cpu" else 1, min_reps=1, max_reps=2, budget_s=0.0),
            skip_compile="quick mode: torch.compile takes seconds per graph",
            probe_matmul=(256, 256, 256), probe_copy_bytes=2**22,
        )
    if device.type == "cuda":
        return Config(
            "full-gpu", hidden=4096, dtype=torch.bfloat16,
            vocab_sweep=(8192, (32000, 49152, 128256, 256000)),
            token_sweep=(128256, (1024, 2048, 4096, 8192, 16384, 32768)),
            extra_shapes=(),
            policy=RepeatPolicy(warmup=2, min_reps=5, max_reps=50, budget_s=1.0),
        )
    # Two shared cores manage 10-30 fp32 GFLOP/s: N stops at 1024 to keep the sweep near ten
    # minutes, and a point slower than the 2 s budget is timed once (its `repeats` says so).
    return Config(
        "full-cpu", hidden=576, dtype=torch.float32,
        vocab_sweep=(256, (32000, 49152, 128256)), token_sweep=(49152, (256, 512, 1024)),
        extra_shapes=((INTERPRETER_MAX_TOKENS, INTERPRETER_MAX_VOCAB),),
        policy=RepeatPolicy(warmup=0, min_reps=1, max_reps=5, budget_s=2.0),
        probe_matmul=(2048, 576, 32000), probe_copy_bytes=2**28,
    )


# ---------------------------------------------------------------------------------------------
# Inputs, steps and the float64 reference


def make_inputs(op: str, tokens: int, vocab: int, hidden: int, dtype: torch.dtype,
                device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """The op's arguments: ``[logits]`` or ``[hidden, weight, targets, token_weights]``.

    Logits have a standard deviation of about 3, like a trained LM head's.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    like = {"generator": gen, "device": device, "dtype": dtype}
    if op == "entropy":
        return [torch.randn(tokens, vocab, **like) * 3]
    h = torch.randn(tokens, hidden, **like)
    w = torch.randn(vocab, hidden, **like) * (3 / math.sqrt(hidden))
    targets = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    return [h, w, targets, torch.ones(tokens, device=device)]


def _leaves(op: str, args: list[torch.Tensor]) -> list[torch.Tensor]:
    return args[:1] if op == "entropy" else args[:2]


def _outputs(op: str, out: object) -> dict[str, torch.Tensor]:
    if op == "entropy":
        return {"entropy": out}
    if op == "logprob_entropy":
        return {"logp": out[0], "entropy": out[1]}
    return {"loss": out}


def _grad_names(op: str) -> tuple[str, ...]:
    return ("d_logits",) if op == "entropy" else ("d_hidden", "d_weight")


def make_step(fn: Callable, op: str, mode: str, args: list[torch.Tensor]) -> Callable[[], dict]:
    """One measured call: the forward under no_grad, or forward and backward of the sum of the
    outputs (for logprob_entropy, upstream gradient 1 on both log-prob and entropy)."""
    leaves = _leaves(op, args)
    for leaf in leaves:
        leaf.requires_grad_(mode == "fwd+bwd")

    def step() -> dict[str, torch.Tensor]:
        if mode == "fwd":
            with torch.no_grad():
                return _outputs(op, fn(*args))
        outs = _outputs(op, fn(*args))
        sum(o.float().sum() for o in outs.values()).backward()
        return outs

    return step


def drop_grads(op: str, args: list[torch.Tensor]) -> None:
    """Forget the gradients of the op's differentiable inputs (before each measured call)."""
    for leaf in _leaves(op, args):
        leaf.grad = None


def _with_grads(op: str, outs: dict, args: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    grads = {n: leaf.grad for n, leaf in zip(_grad_names(op), _leaves(op, args)) if leaf.grad is not None}
    return {**outs, **grads}


def reference(op: str, args: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Outputs and gradients in float64 from the plain formulas, on the given (small) inputs."""
    f64 = [a.detach().double() if a.is_floating_point() else a for a in args]
    step = make_step(NAIVE_FNS[op], op, "fwd+bwd", f64)
    return {k: v.detach() for k, v in _with_grads(op, step(), f64).items()}


def error_slice(op: str, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """The first ``ERR_TOKENS`` tokens of the op's inputs (the whole weight), as fresh leaves."""
    n = min(ERR_TOKENS, args[0].shape[0])
    if op == "entropy":
        return [args[0][:n].detach().clone()]
    h, w, t, tw = args
    return [h[:n].detach().clone(), w.detach().clone(), t[:n], tw[:n]]


def max_errors(fn: Callable, op: str, mode: str, args: list[torch.Tensor],
               ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs error of each output (and gradient, forward+backward) against ``ref``."""
    sliced = error_slice(op, args)
    got = _with_grads(op, make_step(fn, op, mode, sliced)(), sliced)
    return {k: float((v.detach().double() - ref[k].to(v.device)).abs().max()) for k, v in got.items()}


# ---------------------------------------------------------------------------------------------
# Running the sweep


@dataclass
class Probes:
    """Device rates measured in the same run: bf16 (GPU) / fp32 (CPU) matmul, memory copy."""

    matmul_tflops: list[float] = field(default_factory=list)
    copy_gbps: list[float] = field(default_factory=list)

    def run(self, config: Config, device: torch.device) -> None:
        m, k, n = config.probe_matmul
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        policy = RepeatPolicy(warmup=1, min_reps=3, max_reps=20, budget_s=0.5)
        self.matmul_tflops.append(2 * m * k * n / median_seconds(measure(lambda: a @ b, device, policy)) / 1e12)
        src = torch.empty(config.probe_copy_bytes // 4, device=device)
        dst = torch.empty_like(src)
        seconds = median_seconds(measure(lambda: dst.copy_(src), device, policy))
        self.copy_gbps.append(2 * config.probe_copy_bytes / seconds / 1e9)  # read + write

    def as_dict(self) -> dict:
        # Fractions use the best rate seen: on a shared machine that errs against gem_fast.
        return {"matmul_tflops": self.matmul_tflops, "copy_gbps": self.copy_gbps,
                "matmul_tflops_used": max(self.matmul_tflops), "copy_gbps_used": max(self.copy_gbps)}


def skip_reason(provider: Provider, op: str, tokens: int, vocab: int, config: Config,
                device: torch.device) -> str | None:
    """Why a provider is not run at a point (None: it runs)."""
    if provider.triton and device.type != "cuda" and (
        tokens > INTERPRETER_MAX_TOKENS or vocab > INTERPRETER_MAX_VOCAB
    ):
        return (f"Triton interpreter on CPU: skipped above N={INTERPRETER_MAX_TOKENS}, "
                f"V={INTERPRETER_MAX_VOCAB}")
    if provider.jit and config.skip_compile:
        return config.skip_compile
    naive_bytes = NAIVE_LOGIT_COPIES * tokens * vocab * 4
    if provider.name in ("naive", "torch_compile") and device.type != "cuda" and naive_bytes > CPU_NAIVE_CAP_BYTES:
        return f"needs ~{naive_bytes / 2**30:.0f} GB for [N, V] logits copies, over the {CPU_NAIVE_CAP_BYTES // 2**30} GB CPU cap"
    return None


def _throughput(op: str, mode: str, tokens: int, vocab: int, hidden: int, dtype: torch.dtype,
                seconds: float, probes: dict) -> tuple[float, str, float]:
    if op == "entropy":
        # Bytes a perfect kernel moves: read the logits (fwd), read them again and write the grad.
        moved = (1 if mode == "fwd" else 3) * tokens * vocab * dtype.itemsize
        gbps = moved / seconds / 1e9
        return gbps, "GB/s", gbps / probes["copy_gbps_used"]
    flops = (2 if mode == "fwd" else 6) * tokens * hidden * vocab
    tflops = flops / seconds / 1e12
    return tflops, "TFLOP/s", tflops / probes["matmul_tflops_used"]


def run_point(provider: Provider, op: str, mode: str, tokens: int, vocab: int, config: Config,
              device: torch.device, args: list[torch.Tensor], ref: Callable[[], dict],
              probes: dict) -> dict:
    """Measure one (provider, op, mode, shape); failures become rows, not exceptions."""
    row = {"op": op, "mode": mode, "tokens": tokens, "vocab": vocab, "hidden": config.hidden,
           "dtype": str(config.dtype).removeprefix("torch."), "provider": provider.name,
           "backend": provider.backend, "device": device_name(device), "status": "ok", "time_ms": None,
           "repeats": 0, "peak_extra_bytes": None, "throughput": None, "throughput_unit": None,
           "fraction_of_peak": None, "max_abs_err": None}
    if device.type != "cuda":
        row["loadavg"] = list(os.getloadavg())
    if not provider.installed():
        return {**row, "status": "not installed", "reason": f"python module {provider.requires!r} not found"}
    reason = skip_reason(provider, op, tokens, vocab, config, device)
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    leaves = _leaves(op, args)
    try:
        fn = provider.build(op)
        step = make_step(fn, op, mode, args)
        policy = config.policy
        if provider.jit and policy.warmup == 0:
            policy = RepeatPolicy(1, policy.min_reps, policy.max_reps, policy.budget_s)
        samples = measure(step, device, policy, before_each=lambda: drop_grads(op, args))
        # Gradients are outputs every method must return: not counted as its working memory.
        grad_bytes = sum(l.grad.numel() * l.grad.element_size() for l in leaves if l.grad is not None)
        errors = max_errors(fn, op, mode, args, ref())
    except Exception as exc:  # a peer failing at a size (OOM, assertion) is a result to record
        lines = traceback.format_exception_only(exc)[-1].strip().splitlines()
        return {**row, "status": "error", "error": lines[0][:300]}
    finally:
        drop_grads(op, args)
    seconds = median_seconds(samples)
    peaks = [s.peak_bytes for s in samples if s.peak_bytes is not None]
    throughput, unit, fraction = _throughput(op, mode, tokens, vocab, config.hidden, config.dtype,
                                             seconds, probes)
    return {**row, "time_ms": seconds * 1e3, "times_ms": [s.seconds * 1e3 for s in samples],
            "repeats": len(samples),
            "peak_extra_bytes": max(peaks) - grad_bytes if peaks else None,
            "throughput": throughput, "throughput_unit": unit, "fraction_of_peak": fraction,
            "max_abs_err": max(errors.values()), "errors": errors,
            "err_tokens": min(ERR_TOKENS, tokens)}


def run(config: Config, device: torch.device, log: Callable[[str], None] = print) -> dict:
    """Run every (shape, op, mode, provider) point of ``config``; returns the results document."""
    began = time.perf_counter()
    env_start = environment(device)
    providers = build_providers(device)
    probes = Probes()
    probes.run(config, device)
    probe_rates = probes.as_dict()
    rows = []
    for tokens, vocab in config.shapes():
        for op in OPS:
            args = make_inputs(op, tokens, vocab, config.hidden, config.dtype, device)
            cached: dict[str, dict] = {}

            def ref() -> dict:
                # Shared by every provider and mode of this op and shape; computed on first use.
                if "ref" not in cached:
                    cached["ref"] = reference(op, error_slice(op, args))
                return cached["ref"]

            for mode in MODES:
                for provider in providers:
                    if op not in provider.ops:
                        continue
                    row = run_point(provider, op, mode, tokens, vocab, config, device, args, ref, probe_rates)
                    rows.append(row)
                    log(_log_line(row))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()  # after an OOM, give the next point the whole card
            del args, cached
    probes.run(config, device)
    return {
        "schema": 1,
        "config": {"name": config.name, "hidden": config.hidden, "dtype": str(config.dtype),
                   "vocab_sweep": {"tokens": config.vocab_sweep[0], "vocab": list(config.vocab_sweep[1])},
                   "token_sweep": {"vocab": config.token_sweep[0], "tokens": list(config.token_sweep[1])},
                   "extra_shapes": [list(s) for s in config.extra_shapes],
                   "repeat_policy": vars(config.policy), "err_tokens": ERR_TOKENS,
                   "memory_method": PeakMemory(device).method},
        "environment": {**env_start, "loadavg_end": list(os.getloadavg()) if device.type != "cuda" else None},
        "probes": probes.as_dict(),
        "providers": [{"name": p.name, "ops": list(p.ops), "backend": p.backend,
                       "installed": p.installed(), "version": p.version()} for p in providers],
        "wall_s": time.perf_counter() - began,
        "rows": rows,
    }


def _log_line(row: dict) -> str:
    head = f"{row['op']:<16}{row['mode']:<8}N={row['tokens']:<6}V={row['vocab']:<7}{row['provider']:<16}"
    if row["status"] != "ok":
        return head + f"{row['status']}: {row.get('reason') or row.get('error')}"
    mem = row["peak_extra_bytes"]
    mem_s = f"{mem / 2**20:9.1f} MB" if mem is not None else "   n/a"
    return head + (f"{row['time_ms']:10.2f} ms {mem_s}  {row['throughput']:.3g} {row['throughput_unit']}"
                   f"  err {row['max_abs_err']:.1e}")


# ---------------------------------------------------------------------------------------------
# Validation and reports


def validate(doc: dict) -> None:
    """Raise ValueError unless ``doc`` is a complete results document."""
    for key in ("schema", "config", "environment", "probes", "providers", "rows"):
        if key not in doc:
            raise ValueError(f"results: missing {key!r}")
    if not doc["rows"]:
        raise ValueError("results: no rows")
    for i, row in enumerate(doc["rows"]):
        missing = [f for f in REQUIRED_ROW_FIELDS if f not in row]
        if missing:
            raise ValueError(f"row {i}: missing fields {missing}")
        if row["status"] not in STATUSES:
            raise ValueError(f"row {i}: unknown status {row['status']!r}")
        if row["status"] == "ok":
            if not (row["time_ms"] and row["time_ms"] > 0 and row["repeats"] > 0):
                raise ValueError(f"row {i}: ok without a positive time")
            if row["max_abs_err"] is None or not math.isfinite(row["max_abs_err"]):
                raise ValueError(f"row {i}: ok without a finite error")
        elif not (row.get("reason") or row.get("error")):
            raise ValueError(f"row {i}: status {row['status']!r} without a reason or error")


def _fmt_mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f}"


def _table(rows: list[dict]) -> list[str]:
    lines = ["| op | mode | N | V | provider | backend | status | median ms | × gem_fast time | "
             "peak extra MB | throughput | % of matmul / copy | max abs err |",
             "|" + "---|" * 13]
    gem_time = {(r["op"], r["mode"], r["tokens"], r["vocab"]): r["time_ms"]
                for r in rows if r["provider"] == "gem_fast" and r["status"] == "ok"}
    for r in rows:
        key = (r["op"], r["mode"], r["tokens"], r["vocab"])
        if r["status"] == "ok":
            ratio = f"{r['time_ms'] / gem_time[key]:.2f}" if key in gem_time else "–"
            cells = [f"{r['time_ms']:,.2f}", ratio, _fmt_mb(r["peak_extra_bytes"]),
                     f"{r['throughput']:.3g} {r['throughput_unit']}", f"{100 * r['fraction_of_peak']:.0f} %",
                     f"{r['max_abs_err']:.1e}"]
            status = "ok"
        else:
            cells = ["–"] * 6
            status = f"{r['status']}: {r.get('reason') or r.get('error')}".replace("|", "/")
        lines.append(f"| {r['op']} | {r['mode']} | {r['tokens']} | {r['vocab']} | {r['provider']} | "
                     f"{r['backend']} | {status} | " + " | ".join(cells) + " |")
    return lines


def headline_rows(doc: dict) -> list[dict]:
    """Per op and mode, every provider's row at the largest shape where gem_fast ran."""
    rows = doc["rows"]
    picked = []
    for op in OPS:
        for mode in MODES:
            ours = [r for r in rows if r["op"] == op and r["mode"] == mode
                    and r["provider"] == "gem_fast" and r["status"] == "ok"]
            if not ours:
                continue
            top = max(ours, key=lambda r: (r["tokens"] * r["vocab"], r["vocab"]))
            picked += [r for r in rows if r["op"] == op and r["mode"] == mode
                       and (r["tokens"], r["vocab"]) == (top["tokens"], top["vocab"])]
    return picked


def markdown(doc: dict) -> str:
    env, probes, cfg = doc["environment"], doc["probes"], doc["config"]
    versions = ", ".join(f"{p['name']} {p['version'] or ('installed' if p['installed'] else 'not installed')}"
                         for p in doc["providers"] if p["name"] in ("liger", "cce"))
    load = f"; load average {env['loadavg']} → {env['loadavg_end']}" if env.get("loadavg") else ""
    lines = [
        f"# gem_fast kernel benchmarks: {env['device']} ({env['date'][:10]})",
        "",
        f"Config `{cfg['name']}`: H={cfg['hidden']}, {cfg['dtype']}; torch {env['torch']}, triton {env['triton']}, "
        f"{versions}; {env['cpu_threads']} CPU threads{load}.",
        f"Probes in the same run: matmul {', '.join(f'{x:.3g}' for x in probes['matmul_tflops'])} TFLOP/s, "
        f"copy {', '.join(f'{x:.3g}' for x in probes['copy_gbps'])} GB/s (start, end; fractions use the best).",
        f"Peak extra memory: {cfg['memory_method']}, beyond inputs, weights and returned gradients. "
        f"Error: max abs vs float64 on the first {cfg['err_tokens']} tokens. "
        "Throughput counts 2NHV (fwd) / 6NHV (fwd+bwd) FLOPs, or the logits bytes read and written (entropy). "
        "`weighted_loss` uses unit token weights, i.e. the summed cross-entropy the peers compute.",
        "",
        "## Headline (largest shape per op and mode)",
        "",
        *_table(headline_rows(doc)),
        "",
        "## All points",
        "",
        *_table(doc["rows"]),
        "",
    ]
    return "\n".join(lines)


def plot(doc: dict, out_dir: Path) -> list[Path]:
    """Time and memory vs vocab (fixed N) and vs tokens (fixed V), log scales, one panel per op/mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    cfg, rows = doc["config"], [r for r in doc["rows"] if r["status"] == "ok"]
    sweeps = {
        "vocab": ("vocab", "tokens", cfg["vocab_sweep"]["tokens"], "vocab size V"),
        "tokens": ("tokens", "vocab", cfg["token_sweep"]["vocab"], "tokens N"),
    }
    metrics = {"time": ("time_ms", "median time (ms)"), "memory": ("peak_extra_bytes", "peak extra memory (MB)")}
    written = []
    for sweep, (x_key, fixed_key, fixed, x_label) in sweeps.items():
        for metric, (y_key, y_label) in metrics.items():
            fig, axes = plt.subplots(len(MODES), len(OPS), figsize=(15, 8), squeeze=False)
            for (i, mode), (j, op) in ((m, o) for m in enumerate(MODES) for o in enumerate(OPS)):
                ax = axes[i][j]
                sel = [r for r in rows if r["op"] == op and r["mode"] == mode and r[fixed_key] == fixed
                       and r[y_key] is not None]
                for name in dict.fromkeys(r["provider"] for r in sel):
                    pts = sorted((r[x_key], r[y_key]) for r in sel if r["provider"] == name)
                    ys = [y / 2**20 if metric == "memory" else y for _, y in pts]
                    ax.plot([x for x, _ in pts], ys, marker="o", label=name)
                ax.set_xscale("log")
                ax.set_yscale("log", nonpositive="mask")  # a peak at or below the baseline is noise
                xs = sorted({r[x_key] for r in sel})
                ax.set_xticks(xs, [str(x) for x in xs], rotation=30)
                ax.xaxis.set_minor_locator(ticker.NullLocator())
                ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
                ax.set_title(f"{op} {mode} ({fixed_key}={fixed})", fontsize=10)
                ax.set_xlabel(x_label)
                ax.set_ylabel(y_label)
                ax.grid(True, which="both", alpha=0.3)
                if sel:
                    ax.legend(fontsize=8)
            env = doc["environment"]
            fig.suptitle(f"gem_fast {metric} vs {sweep}: {env['device']}, {env['date'][:10]}, "
                         f"H={cfg['hidden']}, {cfg['dtype']}")
            fig.tight_layout()
            path = out_dir / f"{metric}_vs_{sweep}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def write_outputs(doc: dict, out_dir: Path) -> list[Path]:
    """results.json, results.md and the PNG plots under ``out_dir``."""
    validate(doc)
    return [*write_results(out_dir, "results", doc, markdown(doc)), *plot(doc, out_dir)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny shapes, seconds (CI)")
    size.add_argument("--full", action="store_true", help="the sweep sized for the device (default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="results root; files go to OUT/<device>/ (default: bench/results, "
                             "or a temporary folder with --quick)")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    mode = "quick" if opts.quick else "full"
    out_dir = results_dir(opts.out, opts.quick, device)
    doc = run(make_config(mode, device), device, log=lambda line: print(line, flush=True))
    for path in write_outputs(doc, out_dir):
        print(f"wrote {path}")
    print(f"{len(doc['rows'])} rows in {doc['wall_s']:.0f} s; {status_counts(doc['rows'], STATUSES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
