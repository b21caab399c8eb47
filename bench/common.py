"""Timing, peak-memory and environment helpers shared by the benchmark scripts.

Times are wall-clock on the CPU and CUDA-event times on a GPU. Peak memory is what a call
allocates beyond what existed when it started: ``torch.cuda.max_memory_allocated`` on a GPU,
and on the CPU the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) after ``malloc_trim`` has handed freed heap pages back, so a call
cannot hide its peak in pages an earlier call left behind.
"""

from __future__ import annotations

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
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from gem_fast.plan.shapes import ModelShape


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


def random_llama(shape: "ModelShape", device: torch.device, *, seed: int = 0):
    """fp32 ``LlamaForCausalLM`` of ``shape`` (a :class:`gem_fast.plan.shapes.ModelShape`) with random
    weights (init std 0.02) on ``device``, in training mode; attention as for a loaded model
    (:func:`gem_fast.models.choose_attn_implementation`). The global RNG is left as it was."""
    # Imported here: transformers takes seconds to import and most benchmark processes never build one.
    from transformers import LlamaConfig, LlamaForCausalLM

    from gem_fast.models import choose_attn_implementation

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, tie_word_embeddings=shape.tied, max_position_embeddings=8192,
        rope_theta=500000.0,
    )
    config._attn_implementation = choose_attn_implementation(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).train()


def write_results(out_dir: Path, stem: str, doc: dict, markdown: str) -> list[Path]:
    """``<stem>.json`` (the raw document) and ``<stem>.md`` (its table) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(markdown)
    return [json_path, md_path]


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
