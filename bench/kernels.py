"""Benchmark gem_fast's vocab kernels against naive torch, torch.compile, Liger-Kernel and CCE.

    python -m bench.kernels            # full sweep sized for the device present (GPU or CPU)
    python -m bench.kernels --quick    # seconds: tiny shapes, checks the harness and the JSON

The ops are in :mod:`bench.kernel_ops`, the implementations in :mod:`bench.kernel_providers`, the
tables and plots in :mod:`bench.kernel_report`; this module holds the sweeps and runs them.

Fairness: at each point (op, mode, shape) every provider gets a warm-up call, then the providers
are timed round-robin (a load drift hits all alike) until each has at least three samples; the
median is reported. torch.compile compiles once per point with static shapes, and only at the
points named in the config (on a GPU the headline shape). Every point records the median time,
peak memory beyond inputs, weights and the gradients the call returns, throughput as a fraction
of a matmul / copy rate probed in the same run, and the max abs error against float64 on a slice
of tokens. Results go to ``<out>/<device>/``: ``results.json``, ``results.md`` and PNG plots.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

# Triton kernels (Liger's, CCE's, gem_fast's triton backend) can only run on a CPU through the
# interpreter, which must be chosen before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .common import (  # noqa: E402
    PeakMemory, RepeatPolicy, bench_parser, copy_gbps, device_name, environment, error_line, matmul_tflops,
    measure_interleaved, median_seconds, report, results_dir, status_counts,
)
from .kernel_ops import (  # noqa: E402
    ERR_TOKENS,
    MODES,
    OPS,
    drop_grads,
    error_slice,
    grad_bytes,
    make_inputs,
    make_step,
    max_errors,
    reference,
    throughput,
)
from .kernel_providers import Provider, build_providers  # noqa: E402
from .kernel_report import STATUSES, write_outputs  # noqa: E402

# Triton on a CPU runs in the interpreter, thousands of times slower than compiled code.
INTERPRETER_MAX_TOKENS, INTERPRETER_MAX_VOCAB = 64, 2048
# On the CPU, a naive point whose logits copies would pass this is skipped, not run into swap.
CPU_NAIVE_CAP_BYTES = 12 * 2**30
NAIVE_LOGIT_COPIES = 6  # [N, V] float32 tensors alive at once in naive forward+backward
Point = tuple[int, int]  # (tokens, vocab)


@dataclass(frozen=True)
class Sweep:
    """Points measured alike: each op of ``ops`` in each mode of ``modes`` at every ``(tokens, vocab)``
    of ``points``, by the providers named in ``providers`` (None: all of them)."""

    name: str
    points: tuple[Point, ...]
    policy: RepeatPolicy
    ops: tuple[str, ...] = OPS
    modes: tuple[str, ...] = MODES
    providers: tuple[str, ...] | None = None
    axis: str | None = None  # "vocab" or "tokens": plotted against it (the other coordinate is fixed)
    memory_only: bool = False  # one sample a point: its times are single runs, left out of time plots

    def __post_init__(self) -> None:
        if self.axis is not None:
            fixed = {p[1] if self.axis == "tokens" else p[0] for p in self.points}
            if self.axis not in ("vocab", "tokens") or len(fixed) != 1:
                raise ValueError(f"sweep {self.name!r}: axis {self.axis!r} needs one fixed value, got {fixed}")

    def runs(self, provider: Provider) -> bool:
        return self.providers is None or provider.name in self.providers


@dataclass(frozen=True)
class Config:
    """A benchmark run: the sweeps, in order; a provider already measured at a point by an earlier sweep
    is not measured there again."""

    name: str
    hidden: int
    dtype: torch.dtype
    sweeps: tuple[Sweep, ...]
    headline: Point  # the shape of the headline table
    compile_at: tuple[Point, ...] = ()  # torch.compile runs only here (it compiles once per point)
    skip_compile: str | None = None  # reason, when torch.compile is not run at all
    probe_matmul: tuple[int, int, int] = (8192, 8192, 8192)
    probe_copy_bytes: int = 2**30

    def points(self) -> list[tuple[Sweep, int, int, str, str]]:
        """``(sweep, tokens, vocab, op, mode)`` in run order."""
        return [(sweep, tokens, vocab, op, mode) for sweep in self.sweeps for tokens, vocab in sweep.points
                for op in sweep.ops for mode in sweep.modes]

    def as_dict(self) -> dict:
        return {**asdict(self), "dtype": str(self.dtype).removeprefix("torch.")}


FAIR = RepeatPolicy(warmup=1, min_reps=3, max_reps=5, budget_s=2.0)


def make_config(mode: str, device: torch.device) -> Config:
    """``quick``: tiny shapes for CI; ``full``: the sweeps sized for ``device``."""
    if mode == "quick":
        return Config(
            "quick", hidden=64, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16,
            sweeps=(Sweep("vocab", ((16, 256), (16, 512)), RepeatPolicy(1, 3, 3, 0.0), axis="vocab"),
                    Sweep("tokens", ((8, 512), (16, 512)), RepeatPolicy(1, 3, 3, 0.0), axis="tokens"),
                    Sweep("memory", ((32, 512),), RepeatPolicy(0, 1, 1, 0.0), modes=("fwd+bwd",),
                          providers=("gem_fast", "naive"), axis="tokens", memory_only=True)),
            headline=(16, 512), skip_compile="quick mode: torch.compile takes seconds per graph",
            probe_matmul=(256, 256, 256), probe_copy_bytes=2**22,
        )
    if device.type == "cuda":
        return Config(
            "full-gpu", hidden=4096, dtype=torch.bfloat16,
            sweeps=(Sweep("vocab", tuple((8192, v) for v in (32000, 49152, 128256, 256000)), FAIR, axis="vocab"),
                    Sweep("tokens", tuple((n, 128256) for n in (1024, 4096, 16384, 32768)), FAIR, axis="tokens")),
            headline=(32768, 128256), compile_at=((32768, 128256),),
        )
    # Two shared cores manage 10-30 fp32 GFLOP/s. Timed points stop at N·V = 1024·49152 (a few
    # seconds a call, four calls per provider); the memory sweep reaches N=8192 with one call each.
    return Config(
        "full-cpu", hidden=576, dtype=torch.float32,
        sweeps=(Sweep("vocab", tuple((256, v) for v in (32000, 49152, 128256)), FAIR, axis="vocab"),
                Sweep("tokens", tuple((n, 49152) for n in (256, 512, 1024)), FAIR, axis="tokens"),
                Sweep("memory", tuple((n, 49152) for n in (2048, 4096, 8192)), RepeatPolicy(0, 1, 1, 0.0),
                      modes=("fwd+bwd",), providers=("gem_fast", "naive"), axis="tokens", memory_only=True),
                Sweep("interpreter", ((INTERPRETER_MAX_TOKENS, INTERPRETER_MAX_VOCAB),), FAIR)),
        headline=(1024, 49152), compile_at=((1024, 49152),),
        probe_matmul=(2048, 576, 32000), probe_copy_bytes=2**28,
    )


@dataclass
class Probes:
    """Device rates measured in the same run: bf16 (GPU) / fp32 (CPU) matmul, memory copy."""

    matmul_tflops: list[float] = field(default_factory=list)
    copy_gbps: list[float] = field(default_factory=list)

    def run(self, config: Config, device: torch.device) -> None:
        self.matmul_tflops.append(matmul_tflops(device, *config.probe_matmul))
        self.copy_gbps.append(copy_gbps(device, config.probe_copy_bytes))

    def as_dict(self) -> dict:
        # Fractions use the best rate seen: on a shared machine that errs against gem_fast.
        return {"matmul_tflops": self.matmul_tflops, "copy_gbps": self.copy_gbps,
                "matmul_tflops_used": max(self.matmul_tflops), "copy_gbps_used": max(self.copy_gbps)}


def skip_reason(provider: Provider, op: str, tokens: int, vocab: int, config: Config,
                device: torch.device) -> str | None:
    """Why a provider is not run at a point (None: it runs)."""
    if provider.unavailable:
        return provider.unavailable
    if provider.triton and device.type != "cuda" and (
        tokens > INTERPRETER_MAX_TOKENS or vocab > INTERPRETER_MAX_VOCAB
    ):
        return (f"Triton interpreter on CPU: skipped above N={INTERPRETER_MAX_TOKENS}, "
                f"V={INTERPRETER_MAX_VOCAB}")
    if provider.jit and config.skip_compile:
        return config.skip_compile
    if provider.jit and (tokens, vocab) not in config.compile_at:
        return "compiled only at " + ", ".join(f"N={n}, V={v}" for n, v in config.compile_at)
    naive_bytes = NAIVE_LOGIT_COPIES * tokens * vocab * 4
    if provider.name in ("naive", "torch_compile") and device.type != "cuda" and naive_bytes > CPU_NAIVE_CAP_BYTES:
        return f"needs ~{naive_bytes / 2**30:.0f} GB for [N, V] logits copies, over the {CPU_NAIVE_CAP_BYTES // 2**30} GB CPU cap"
    return None


def run_point(providers: list[Provider], sweep: Sweep, op: str, mode: str, tokens: int, vocab: int,
              config: Config, device: torch.device, args: list[torch.Tensor], ref: Callable[[], dict],
              probes: dict) -> list[dict]:
    """Measure every provider of ``sweep`` at one (op, mode, shape), interleaved; one row each.

    Failures (an out-of-memory, a peer's assertion) become rows with their error, not exceptions.
    """
    rows: dict[str, dict] = {}
    steps: dict[str, Callable] = {}
    fns: dict[str, Callable] = {}
    for provider in providers:
        if op not in provider.ops or mode not in provider.modes or not sweep.runs(provider):
            continue
        row = rows[provider.name] = {
            "op": op, "mode": mode, "tokens": tokens, "vocab": vocab, "hidden": config.hidden,
            "dtype": str(config.dtype).removeprefix("torch."), "provider": provider.name, "sweep": sweep.name,
            "backend": provider.backend, "device": device_name(device), "status": "ok", "time_ms": None,
            "repeats": 0, "peak_extra_bytes": None, "throughput": None, "throughput_unit": None,
            "fraction_of_peak": None, "max_abs_err": None}
        if device.type != "cuda":
            row["loadavg"] = list(os.getloadavg())
        if not provider.installed():
            row.update(status="not installed", reason=f"python module {provider.requires!r} not found")
        elif reason := skip_reason(provider, op, tokens, vocab, config, device):
            row.update(status="skipped", reason=reason)
        else:
            try:
                fns[provider.name] = provider.build(op)
                steps[provider.name] = make_step(fns[provider.name], op, mode, args)
            except Exception as exc:  # noqa: BLE001 - a peer that cannot even load is a result
                row.update(status="error", error=error_line(exc))
    samples = measure_interleaved(steps, device, sweep.policy, before_each=lambda: drop_grads(op, args))
    drop_grads(op, args)
    jit = {p.name for p in providers if p.jit}
    for name, got in samples.items():
        row = rows[name]
        if isinstance(got, str):
            row.update(status="error", error=got)
            continue
        try:
            errors = {} if name in jit else max_errors(fns[name], op, mode, args, ref())
        except Exception as exc:  # noqa: BLE001
            row.update(status="error", error="float64 check: " + error_line(exc))
            continue
        finally:
            drop_grads(op, args)
        seconds = median_seconds(got)
        peaks = [s.peak_bytes for s in got if s.peak_bytes is not None]
        rate, unit, fraction = throughput(op, mode, tokens, vocab, config.hidden, config.dtype, seconds,
                                          probes["matmul_tflops_used"], probes["copy_gbps_used"])
        row.update(time_ms=seconds * 1e3, times_ms=[s.seconds * 1e3 for s in got], repeats=len(got),
                   # Gradients are outputs every method must return: not counted as its working memory.
                   peak_extra_bytes=max(peaks) - grad_bytes(op, mode, args) if peaks else None,
                   throughput=rate, throughput_unit=unit, fraction_of_peak=fraction,
                   max_abs_err=max(errors.values()) if errors else None, errors=errors,
                   err_tokens=min(ERR_TOKENS, tokens))
        if name in jit:
            row["error_check"] = "not run: the float64 check's slice shape would compile a second graph"
    return list(rows.values())


def run(config: Config, device: torch.device, log: Callable[[str], None] = print,
        emit: Callable[[dict], None] = lambda row: None) -> dict:
    """Run every point of ``config``; ``emit`` gets each row as it is measured (its rate fraction against
    the first probe; the document's rows use the best of both). Returns the results document."""
    began = time.perf_counter()
    env_start = environment(device)
    providers = build_providers(device)
    probes = Probes()
    probes.run(config, device)
    probe_rates = probes.as_dict()
    rows: list[dict] = []
    measured: set[tuple] = set()  # (tokens, vocab, op, mode, provider)
    inputs: dict[tuple, list[torch.Tensor]] = {}
    cached: dict[tuple, dict] = {}
    for sweep, tokens, vocab, op, mode in config.points():
        key = (op, tokens, vocab)
        if key not in inputs:
            inputs.clear()  # one op's inputs alive at a time (at Llama-3 sizes they are GBs)
            cached.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            inputs[key] = make_inputs(op, tokens, vocab, config.hidden, config.dtype, device)
        args = inputs[key]

        def ref(key: tuple = key, op: str = op, args: list[torch.Tensor] = args) -> dict:
            # Shared by every provider and mode of this op and shape; computed on first use.
            if key not in cached:
                cached[key] = reference(op, error_slice(op, args))
            return cached[key]

        todo = [p for p in providers if (tokens, vocab, op, mode, p.name) not in measured]
        for row in run_point(todo, sweep, op, mode, tokens, vocab, config, device, args, ref, probe_rates):
            measured.add((tokens, vocab, op, mode, row["provider"]))
            rows.append(row)
            emit(row)
            log(_log_line(row))
    inputs.clear()
    probes.run(config, device)
    _rescale(rows, config, probes.as_dict())
    return {
        "schema": 2,
        "config": {**config.as_dict(), "err_tokens": ERR_TOKENS, "memory_method": PeakMemory(device).method},
        "environment": {**env_start, "loadavg_end": list(os.getloadavg()) if device.type != "cuda" else None},
        "probes": probes.as_dict(),
        "providers": [{"name": p.name, "ops": list(p.ops), "backend": p.backend, "installed": p.installed(),
                       "version": p.version(), "unavailable": p.unavailable} for p in providers],
        "wall_s": time.perf_counter() - began,
        "rows": rows,
    }


def _rescale(rows: list[dict], config: Config, probes: dict) -> None:
    """Fractions of the device rate against the best probe of the run (rows were emitted with the first)."""
    for row in rows:
        if row["status"] == "ok":
            row["fraction_of_peak"] = throughput(
                row["op"], row["mode"], row["tokens"], row["vocab"], config.hidden, config.dtype,
                row["time_ms"] / 1e3, probes["matmul_tflops_used"], probes["copy_gbps_used"])[2]


def _log_line(row: dict) -> str:
    head = f"{row['op']:<16}{row['mode']:<8}N={row['tokens']:<6}V={row['vocab']:<7}{row['provider']:<18}"
    if row["status"] != "ok":
        return head + f"{row['status']}: {row.get('reason') or row.get('error')}"
    mem = row["peak_extra_bytes"]
    mem_s = f"{mem / 2**20:9.1f} MB" if mem is not None else "   n/a"
    err = f"err {row['max_abs_err']:.1e}" if row["max_abs_err"] is not None else "err not checked"
    return head + f"{row['time_ms']:10.2f} ms {mem_s}  {row['throughput']:.3g} {row['throughput_unit']}  {err}"


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("python -m bench.kernels", __doc__, quick="tiny shapes, seconds (CI)",
                          out="results root; files go to OUT/<device>/ (default: bench/results, "
                              "or a temporary folder with --quick)")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    doc = run(make_config("quick" if opts.quick else "full", device), device, log=lambda line: print(line, flush=True))
    paths, bad = write_outputs(doc, results_dir(opts.out, opts.quick, device))
    return report(paths, f"{len(doc['rows'])} rows in {doc['wall_s']:.0f} s; {status_counts(doc['rows'], STATUSES)}",
                  bad)


if __name__ == "__main__":
    sys.exit(main())
