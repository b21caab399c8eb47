"""Timing, peak-memory and environment helpers shared by the benchmark scripts.

Each sample is one call: timed by CUDA events on a GPU (what ``triton.testing.do_bench`` records per
call) and by ``time.perf_counter`` on the CPU. ``do_bench`` and ``torch.utils.benchmark.Timer`` are
not used for the samples: both run warm-up calls inside every measurement (and ``Timer`` pins torch
to one thread), which the round-robin of providers, the memory window and calls with side effects
(an optimizer step, a sampling call) cannot take. Peak memory is what a call
allocates beyond what existed when it started: ``torch.cuda.max_memory_allocated`` on a GPU,
and on the CPU the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) after ``malloc_trim`` has handed freed heap pages back, so a call
cannot hide its peak in pages an earlier call left behind.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass(frozen=True)
class RepeatPolicy:
    """How many times to run a measured call: ``warmup`` untimed runs, then timed runs until
    at least ``min_reps`` are done and ``budget_s`` seconds are spent, at most ``max_reps``."""

    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float


@dataclass(frozen=True)
class Sample:
    seconds: float
    peak_bytes: int | None  # beyond what was allocated when the call started


def _libc_malloc_trim() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return lambda: None
    return lambda: libc.malloc_trim(0)


_malloc_trim = _libc_malloc_trim()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """This process's resident set now (``VmRSS``)."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """This process's own resident high-water mark (``VmHWM``; ``ru_maxrss`` would carry a launcher's)."""
    return _status_bytes("VmHWM")


class PeakMemory:
    """Peak bytes a call allocates beyond the state at :meth:`start`, on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "rss-high-water"
        self._base = 0
        if device.type != "cuda" and not self._can_reset_rss_peak():
            self.method = "unavailable"

    @staticmethod
    def _can_reset_rss_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def start(self) -> int:
        """Reset the peak; returns the bytes in use now (allocated on CUDA, resident on a CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method != "unavailable":
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self._base = _status_bytes("VmRSS")
        return self._base

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self.method == "unavailable":
            return None
        return _status_bytes("VmHWM") - self._base


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def measure_interleaved(
    calls: dict[str, Callable[[], object]],
    device: torch.device,
    policy: RepeatPolicy,
    before_each: Callable[[], None] = lambda: None,
    *,
    raise_errors: bool = False,
) -> dict[str, list[Sample] | str]:
    """Time several calls round-robin: ``policy.warmup`` untimed rounds, then timed rounds until
    every call has ``min_reps`` samples and ``budget_s`` seconds, at most ``max_reps`` rounds.

    Interleaving makes a load drift on a shared machine hit every call alike. ``before_each``
    runs untimed and outside the memory window (e.g. to drop gradients). A call that raises is
    dropped from later rounds and its entry becomes the error's one-line text (an out-of-memory
    is a result); with ``raise_errors`` the exception propagates instead.
    """
    meter = PeakMemory(device)
    results: dict[str, list[Sample] | str] = {name: [] for name in calls}
    spent = dict.fromkeys(calls, 0.0)

    def attempt(name: str, timed: bool) -> None:
        try:
            before_each()
            if not timed:
                calls[name]()
                return
            meter.start()
            seconds = _timed(calls[name], device)
            results[name].append(Sample(seconds, meter.peak()))
            spent[name] += seconds
        except Exception as exc:
            if raise_errors:
                raise
            results[name] = error_line(exc)  # the text only: the traceback would pin the call's tensors
        if device.type == "cuda" and isinstance(results[name], str):
            torch.cuda.empty_cache()  # after an out-of-memory, give the other calls the whole card

    def live() -> list[str]:
        return [name for name, r in results.items() if not isinstance(r, str)]

    for _ in range(policy.warmup):
        for name in live():
            attempt(name, timed=False)
    rounds = 0
    while live() and rounds < policy.max_reps and (
        rounds < policy.min_reps or min(spent[n] for n in live()) < policy.budget_s
    ):
        for name in live():
            attempt(name, timed=True)
        rounds += 1
    return results


def measure(
    fn: Callable[[], object],
    device: torch.device,
    policy: RepeatPolicy,
    before_each: Callable[[], None] = lambda: None,
) -> list[Sample]:
    """Run ``fn`` per ``policy``; each timed run records its time and its peak memory. Errors propagate."""
    samples = measure_interleaved({"fn": fn}, device, policy, before_each, raise_errors=True)["fn"]
    assert not isinstance(samples, str)
    return samples


PROBE_POLICY = RepeatPolicy(warmup=1, min_reps=3, max_reps=20, budget_s=0.5)


def matmul_tflops(device: torch.device, m: int, k: int, n: int) -> float:
    """The device's matmul rate now, TFLOP/s of an [m, k] @ [k, n] product (bf16 on CUDA, fp32 on a CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    return 2 * m * k * n / median_seconds(measure(lambda: a @ b, device, PROBE_POLICY)) / 1e12


def copy_gbps(device: torch.device, nbytes: int) -> float:
    """The device's copy rate now, GB/s counting read + write, of an fp32 buffer of ``nbytes``."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(measure(lambda: dst.copy_(src), device, PROBE_POLICY)) / 1e9


def error_line(exc: BaseException) -> str:
    """``"OutOfMemoryError: CUDA out of memory..."``: an exception as one line of at most 300 characters."""
    lines = traceback.format_exception_only(type(exc), exc)[-1].strip().splitlines() or [type(exc).__name__]
    return lines[0][:300]


def median_seconds(samples: list[Sample]) -> float:
    return statistics.median(s.seconds for s in samples)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model() or platform.processor() or "cpu"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def device_slug(device: torch.device) -> str:
    """Folder name for a device's results: ``cpu``, or the GPU's name, e.g. ``nvidia-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def write_results(out_dir: Path, stem: str, doc: dict, markdown: str) -> list[Path]:
    """``<stem>.json`` (the raw document) and ``<stem>.md`` (its table) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(markdown)
    return [json_path, md_path]


def check_row(row: dict, required: tuple[str, ...], statuses: tuple[str, ...],
              ok_problem: Callable[[dict], str | None]) -> str | None:
    """What makes a result row incomplete or inconsistent (None: it is sound): a missing field, an unknown
    status, a row not ok without its reason or error, or what ``ok_problem`` finds in an ok row."""
    if missing := [f for f in required if f not in row]:
        return f"missing fields {missing}"
    if row["status"] not in statuses:
        return f"unknown status {row['status']!r}"
    if row["status"] != "ok":
        return None if row.get("reason") or row.get("error") else f"status {row['status']!r} without a reason or error"
    return ok_problem(row)


def validate(doc: dict, keys: tuple[str, ...], problem: Callable[[dict], str | None]) -> None:
    """Raise ValueError unless ``doc`` has every key of ``keys`` and rows that ``problem`` finds sound."""
    for key in keys:
        if key not in doc:
            raise ValueError(f"results: missing {key!r}")
    if not doc["rows"]:
        raise ValueError("results: no rows")
    for i, row in enumerate(doc["rows"]):
        if reason := problem(row):
            raise ValueError(f"row {i}: {reason}")


def mark_bad_rows(rows: list[dict], problem: Callable[[dict], str | None]) -> int:
    """Set ``row["invalid"]`` to what is wrong with each row that ``problem`` rejects; returns how many.

    Writers keep such rows (one bad row must not lose a run) and reports show them as invalid.
    """
    bad = 0
    for row in rows:
        if reason := problem(row):
            row["invalid"] = reason
            bad += 1
    return bad


def write_checked(out_dir: Path, stem: str, doc: dict, markdown: Callable[[dict], str],
                  problem: Callable[[dict], str | None]) -> tuple[list[Path], int]:
    """:func:`write_results` after :func:`mark_bad_rows`; returns the files and how many rows were marked
    invalid (written all the same)."""
    bad = mark_bad_rows(doc["rows"], problem)
    return write_results(out_dir, stem, doc, markdown(doc)), bad


def bench_parser(prog: str, doc: str, *, quick: str, out: str, out_required: bool = False,
                 device: str | None = None, threads: int | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick``, ``--device`` (default ``device``, else CUDA when
    present), ``--out`` and, with a default ``threads``, ``--threads``; the description is the first
    paragraph of the module's ``doc``."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parser.add_argument("--out", type=Path, required=out_required, help=out)
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    return parser


def report(paths: list[Path], summary: str, bad: int = 0) -> int:
    """Print the files written and ``summary``; the exit status: 1 when ``bad`` rows failed their checks."""
    for path in paths:
        print(f"wrote {path}")
    print(summary)
    if bad:
        print(f"{bad} rows failed their checks and are marked invalid in {paths[0]}")
    return 1 if bad else 0


def status_counts(rows: list[dict], statuses: tuple[str, ...]) -> str:
    """``"ok: 3, error: 0"``: how many result rows ended in each status."""
    return ", ".join(f"{s}: {sum(r['status'] == s for r in rows)}" for s in statuses)


def results_dir(out: Path | None, quick: bool, device: torch.device) -> Path:
    """Where a benchmark writes: ``OUT/<device>/``; by default bench/results, or a temporary
    folder for ``--quick`` runs (CI), which must not overwrite the committed results."""
    default = Path(tempfile.gettempdir()) / "gem_fast_bench" if quick else Path(__file__).with_name("results")
    return (out or default) / device_slug(device)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """What a reader needs to reproduce or discount a run: device, versions, threads, load."""
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    else:
        env["loadavg"] = list(os.getloadavg())
    return env
