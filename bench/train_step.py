"""Training-step benchmark: tokens/s, MFU and peak memory of one SFT optimizer step, per variant.

    python -m bench.train_step            # the device present: GPU (Llama-3.2-1B shape) or CPU (embedded SmolLM2)
    python -m bench.train_step --quick    # seconds: a tiny random Llama with a 32k vocab (CI)

One step is what ``gem_fast.train`` runs for a micro-batch plus its optimizer step: the
:class:`~gem_fast.policy.PolicyLoss` forward (SFT objective, every predicted token weighted 1/N),
backward, AdamW step and ``zero_grad(set_to_none=True)``, on fixed-length rows of random token ids
without padding. fp32 weights; on a GPU the step runs under bf16 autocast, as ``train()`` does.

Variants: the loss kernel (``naive``: full ``[N, V]`` logits; ``fused``: gem_fast's ``torch``
backend on a CPU, ``triton`` on a GPU), Liger-Kernel RMSNorm/RoPE/SwiGLU layers off/on (CUDA only),
torch.compile of each decoder layer off/on.

Model FLOPs of a step (the MFU convention: recomputation is not counted), B rows of L tokens::

    6 · P · B·L                          P = matmul weights of the decoder layers (q, k, v, o, gate, up, down)
    + 12 · n_layers · d_attn · L · B·L   attention scores and values, d_attn = heads · head_dim; the full
                                         L × L square (PaLM, torchtitan): causal masking is not discounted
    + 6 · H · V · B·(L-1)                LM head over the predicted positions

MFU = model FLOPs / median step time / the matmul rate measured in the same run with
``bench.kernels.Probes`` (bf16 8192³ on a GPU, fp32 2048×576×32000 on a CPU; the best of a probe
before and after the variants). Peak memory is what a step allocates beyond the weights,
optimizer state and inputs present when it starts (gradients included: each step frees them).
Results go to ``<out>/<device>/train_step.{json,md}``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from transformers import PreTrainedModel

# First: on a CPU it sets TRITON_INTERPRET, which must precede the loading of any Triton kernel.
from . import kernels as kernel_bench
from .common import (
    PeakMemory, RepeatPolicy, bench_parser, check_row, environment, error_line, measure, median_seconds,
    package_version, report, results_dir, status_counts, validate as common_validate, write_checked,
)
from gem_fast.kernels import resolve_backend
from gem_fast.liger_layers import apply_liger_layers, liger_layer_names, use_liger_layers
from gem_fast.models import DEFAULT_GGUF_FILE, load_model, tiny_llama
from gem_fast.plan.shapes import PRESETS, ModelShape
from gem_fast.distributed import parallelize
from gem_fast.policy import PolicyLoss

STATUSES = ("ok", "not run", "error")
REQUIRED_ROW_FIELDS = (
    "variant", "loss", "loss_backend", "liger", "liger_path", "compile", "attention", "status", "time_s", "repeats",
    "tokens", "tokens_per_s", "model_flops", "tflops", "mfu", "peak_extra_bytes", "resident_bytes", "first_loss",
)
FLOPS_FORMULA = ("6·P·B·L + 12·n_layers·d_attn·L·B·L + 6·H·V·B·(L-1); P = decoder matmul weights, "
                 "d_attn = heads·head_dim, attention over the full L×L square, recomputation not counted")


LLAMA_3_2_1B = replace(PRESETS["llama-1b"], name="Llama-3.2-1B shape")
# The LM head dominates its FLOPs and memory: the quick check can see the fused kernel's saving.
QUICK = ModelShape("tiny Llama, 32k vocab", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                   vocab=32000, tied=True)


@dataclass(frozen=True)
class Variant:
    loss: str  # "naive" or "fused"
    liger: bool
    compile: bool

    @property
    def name(self) -> str:
        return "+".join([self.loss, *(["liger"] if self.liger else []), *(["compile"] if self.compile else [])])


@dataclass(frozen=True)
class StepCase:
    """What a run measures: model, rows of tokens, repeats, and why the compiled variants are not run (if so)."""

    mode: str
    shape: ModelShape | None  # None: the embedded SmolLM2
    rows: int
    seq_len: int
    policy: RepeatPolicy
    probe: kernel_bench.Config  # only its probe sizes are used
    skip_compile: str | None = None

    @property
    def model(self) -> str:
        return self.shape.name if self.shape else f"embedded {DEFAULT_GGUF_FILE} (fp32)"


def make_setup(mode: str, device: torch.device) -> StepCase:
    """``quick``: the tiny model, no compile; ``full``: Llama-3.2-1B shape, 8×2048 (GPU) or SmolLM2, 2×256 (CPU)."""
    probe = kernel_bench.make_config(mode, device)
    if mode == "quick":
        return StepCase("quick", QUICK, rows=2, seq_len=128,
                     policy=RepeatPolicy(warmup=1, min_reps=2, max_reps=2, budget_s=0.0), probe=probe,
                     skip_compile="quick mode: inductor needs tens of seconds to compile a layer")
    if device.type == "cuda":
        return StepCase("full-gpu", LLAMA_3_2_1B, rows=8, seq_len=2048,
                     policy=RepeatPolicy(warmup=3, min_reps=5, max_reps=20, budget_s=5.0), probe=probe)
    # Warmup 1: the first step allocates AdamW's state and, compiled, runs inductor. Steps take
    # 5-20 s on two shared cores: up to 5 of them per variant.
    return StepCase("full-cpu", None, rows=2, seq_len=256,
                 policy=RepeatPolicy(warmup=1, min_reps=3, max_reps=5, budget_s=40.0), probe=probe)


def variants() -> list[Variant]:
    """Every combination; Liger-off first, since Liger's RoPE patch is process-wide once applied."""
    return [Variant(loss, liger, compiled) for liger in (False, True) for compiled in (False, True)
            for loss in ("naive", "fused")]


def model_factory(setup: StepCase, device: torch.device) -> Callable[[], PreTrainedModel]:
    """A fresh model per variant, the same weights each time."""
    if setup.shape:
        return lambda: tiny_llama(shape=setup.shape, init_std=0.02, device=device).train()
    base = load_model(None, device=device)  # ~12 s from the GGUF: loaded once, copied per variant
    return lambda: copy.deepcopy(base).train()


# ---------------------------------------------------------------------------------------------
# FLOPs and memory accounting


def decoder_matmul_weights(model: PreTrainedModel) -> int:
    """P: elements of the ``nn.Linear`` weights inside the decoder layers (embeddings and LM head excluded)."""
    return sum(m.weight.numel() for m in model.base_model.layers.modules() if isinstance(m, torch.nn.Linear))


def model_flops(model: PreTrainedModel, rows: int, seq_len: int) -> dict[str, int]:
    """Forward+backward FLOPs of a step by term (see the module docstring) and their ``total``."""
    cfg = model.config
    tokens = rows * seq_len
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    terms = {
        "decoder_matmuls": 6 * decoder_matmul_weights(model) * tokens,
        "attention": 12 * cfg.num_hidden_layers * d_attn * seq_len * tokens,
        "lm_head": 6 * cfg.hidden_size * cfg.vocab_size * rows * (seq_len - 1),
    }
    return {**terms, "total": sum(terms.values())}


def resident_bytes(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the weights and the optimizer state (what a step starts from, besides its inputs)."""
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in [*params, *state])


# ---------------------------------------------------------------------------------------------
# One variant


def sft_inputs(vocab: int, rows: int, seq_len: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """PolicyLoss arguments: random ids [rows, L], no padding, every token but the first a target (weight 1/N)."""
    ids = torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    response = torch.ones(rows, seq_len, dtype=torch.bool, device=device)
    weights = torch.full((rows, seq_len - 1), 1 / (rows * (seq_len - 1)), device=device)
    return ids, torch.ones_like(ids), response, weights


def build_policy(variant: Variant, model: PreTrainedModel, device: torch.device) -> tuple[PolicyLoss, str]:
    """Liger layers (if asked), then the engine's :func:`~gem_fast.distributed.parallelize`; returns the Liger path."""
    if variant.liger:
        apply_liger_layers(model)
    patched = liger_layer_names(model)
    if bool(patched) != variant.liger:  # RoPE left patched by an earlier variant would mislabel this one
        raise RuntimeError(f"{variant.name}: Liger layers found {patched}")
    backend = "naive" if variant.loss == "naive" else resolve_backend("auto", device)
    policy = parallelize(PolicyLoss(model, backend=backend), activation_checkpointing=False, sharded=False,
                         device=device, compile_layers=variant.compile)
    rope = sum(".apply_rotary_pos_emb" in n for n in patched)
    return policy, f"on: {len(patched) - rope} modules + RoPE" if patched else "off"


def not_run_reason(variant: Variant, setup: StepCase, device: torch.device, model_type: str) -> str | None:
    if variant.compile and setup.skip_compile:
        return setup.skip_compile
    if variant.liger:
        try:
            use_liger_layers("on", device, model_type)
        except ValueError as exc:
            return str(exc)
    return None


def run_variant(variant: Variant, make_model: Callable[[], PreTrainedModel], setup: StepCase, device: torch.device
                ) -> dict:
    """Measure one variant (``mfu`` is left to :func:`run`); a failure (OOM, a compile error) becomes its ``error``."""
    row = {"variant": variant.name, "loss": variant.loss, "loss_backend": None, "liger": variant.liger,
           "liger_path": None, "compile": variant.compile, "attention": None, "status": "ok", "time_s": None,
           "repeats": 0, "tokens": setup.rows * setup.seq_len, "tokens_per_s": None, "model_flops": None,
           "tflops": None, "mfu": None, "peak_extra_bytes": None, "resident_bytes": None, "first_loss": None}
    model = make_model()
    row["attention"] = model.config._attn_implementation
    row["model_flops"] = model_flops(model, setup.rows, setup.seq_len)["total"]
    if reason := not_run_reason(variant, setup, device, model.config.model_type):
        return {**row, "status": "not run", "reason": reason}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    try:
        policy, row["liger_path"] = build_policy(variant, model, device)
        row["loss_backend"] = policy.backend
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        inputs = sft_inputs(model.config.vocab_size, setup.rows, setup.seq_len, device)
        losses: list[torch.Tensor] = []

        def step() -> None:
            with autocast:
                loss = policy(*inputs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        samples = measure(step, device, setup.policy)
        row["resident_bytes"] = resident_bytes(params, optimizer)
    except Exception as exc:  # a variant failing (OOM, compile error) is a result to record
        return {**row, "status": "error", "error": error_line(exc)}
    seconds = median_seconds(samples)
    tflops = row["model_flops"] / seconds / 1e12
    peaks = [s.peak_bytes for s in samples if s.peak_bytes is not None]
    return {**row, "time_s": seconds, "times_s": [s.seconds for s in samples], "repeats": len(samples),
            "tokens_per_s": row["tokens"] / seconds, "tflops": tflops,
            "peak_extra_bytes": max(peaks) if peaks else None, "first_loss": float(losses[0])}


def _release(device: torch.device) -> None:
    """Drop what a variant left: its compiled graphs (the next compiles its own) and cached memory."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _set_mfu(rows: list[dict], probes: kernel_bench.Probes) -> None:
    """MFU of the ok rows against the best matmul rate probed so far."""
    rate = probes.as_dict()["matmul_tflops_used"]
    for row in rows:
        if row["status"] == "ok":
            row["mfu"] = row["tflops"] / rate


def run(setup: StepCase, device: torch.device, log: Callable[[str], None] = print,
        emit: Callable[[dict], None] = lambda row: None, only: list[Variant] | None = None) -> dict:
    """The variants ``only`` (default: all) of ``setup`` on ``device``, between two matmul-rate probes;
    ``emit`` gets each row as it is measured (its MFU against the first probe; the document's rows
    use the best of both). Returns the results document."""
    began = time.perf_counter()
    env = environment(device)
    probes = kernel_bench.Probes()
    probes.run(setup.probe, device)
    make_model = model_factory(setup, device)
    reference = make_model()
    flops = model_flops(reference, setup.rows, setup.seq_len)
    config = reference.config
    described = {"hidden": config.hidden_size, "layers": config.num_hidden_layers,
                 "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                 "intermediate": config.intermediate_size, "vocab": config.vocab_size,
                 "params": sum(p.numel() for p in reference.parameters()),
                 "decoder_matmul_params": decoder_matmul_weights(reference)}
    del reference
    rows = []
    for variant in only or variants():
        rows.append(run_variant(variant, make_model, setup, device))
        _set_mfu(rows[-1:], probes)  # against the first probe for now: an emitted row is complete
        emit(rows[-1])
        log(_log_line(rows[-1]))
        _release(device)
    probes.run(setup.probe, device)
    _set_mfu(rows, probes)
    return {
        "schema": 1,
        "config": {"mode": setup.mode, "model": setup.model, **described, "rows": setup.rows,
                   "seq_len": setup.seq_len, "tokens_per_step": setup.rows * setup.seq_len,
                   "weights_dtype": "float32", "autocast": "bfloat16" if device.type == "cuda" else None,
                   "optimizer": "AdamW (torch default: foreach)", "activation_checkpointing": False,
                   "repeat_policy": vars(setup.policy), "memory_method": PeakMemory(device).method,
                   "flops_formula": FLOPS_FORMULA, "model_flops_per_step": flops},
        "environment": {**env, "loadavg_end": list(os.getloadavg()) if device.type != "cuda" else None,
                        "transformers": package_version("transformers"),
                        "liger_kernel": package_version("liger-kernel"), "flash_attn": package_version("flash-attn")},
        "probes": probes.as_dict(),
        "wall_s": time.perf_counter() - began,
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# Validation and reports


def _ok_problem(row: dict) -> str | None:
    if not (isinstance(row["time_s"], (int, float)) and row["time_s"] > 0 and row["repeats"] > 0
            and isinstance(row["first_loss"], float) and math.isfinite(row["first_loss"])):
        return "ok without a positive time and a finite loss"
    return None


def row_problem(row: dict) -> str | None:
    """What makes a training-step row incomplete or inconsistent (None: it is sound)."""
    return check_row(row, REQUIRED_ROW_FIELDS, STATUSES, _ok_problem)


def validate(doc: dict) -> None:
    """Raise ValueError unless ``doc`` is a complete results document with sound rows."""
    common_validate(doc, ("schema", "config", "environment", "probes", "rows"), row_problem)


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def _log_line(row: dict) -> str:
    head = f"{row['variant']:<24}"
    if row["status"] != "ok":
        return head + f"{row['status']}: {row.get('reason') or row.get('error')}"
    return head + (f"{row['time_s']:8.3f} s  {row['tokens_per_s']:9.0f} tok/s  {row['tflops']:.3g} TFLOP/s  "
                   f"peak +{_mb(row['peak_extra_bytes'])} MB  loss {row['first_loss']:.4f}")


def table(rows: list[dict]) -> list[str]:
    """Markdown table of training-step rows."""
    lines = [
        "| variant | loss backend | Liger layers | compile | attention | status | median step s | tokens/s | "
        "model TFLOP/s | MFU | peak extra MB | resident MB | first loss |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        if r.get("status") == "ok" and "invalid" not in r:
            mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
            cells = [f"{r['time_s']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.3g}", mfu,
                     _mb(r["peak_extra_bytes"]), _mb(r["resident_bytes"]), f"{r['first_loss']:.5f}"]
            status = "ok"
        else:
            cells = ["–"] * 7
            status = (f"invalid: {r['invalid']}" if "invalid" in r
                      else f"{r.get('status')}: {r.get('reason') or r.get('error')}")
        liger = r.get("liger_path") or ("on" if r.get("liger") else "off")
        lines.append(f"| {r.get('variant')} | {r.get('loss_backend') or '–'} | {liger} | "
                     f"{'on' if r.get('compile') else 'off'} | {r.get('attention')} | {status.replace('|', '/')} | "
                     + " | ".join(cells) + " |")
    return lines


def markdown(doc: dict) -> str:
    env, cfg, probes = doc["environment"], doc["config"], doc["probes"]
    load = f"; load average {env['loadavg']} → {env['loadavg_end']}" if env.get("loadavg") else ""
    terms = cfg["model_flops_per_step"]
    lines = [
        f"# Training-step benchmark: {env['device']} ({env['date'][:10]})",
        "",
        f"Mode `{cfg['mode']}`: {cfg['model']}, H={cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads "
        f"({cfg['kv_heads']} KV), FFN {cfg['intermediate']}, V={cfg['vocab']}, {cfg['params'] / 1e6:,.1f} M parameters; "
        f"{cfg['rows']} × {cfg['seq_len']} tokens a step, {cfg['weights_dtype']} weights"
        + (f", {cfg['autocast']} autocast" if cfg["autocast"] else "") + f", {cfg['optimizer']}, no activation "
        f"checkpointing. torch {env['torch']}, transformers {env['transformers']}, liger-kernel {env['liger_kernel']}, "
        f"{env['cpu_threads']} CPU threads{load}.",
        "",
        "A step: PolicyLoss forward (SFT, all predicted tokens weighted 1/N) + backward + AdamW step + zero_grad.",
        f"Model FLOPs per step = {cfg['flops_formula']}: {terms['total'] / 1e12:.3f} TFLOP "
        f"(decoder matmuls {terms['decoder_matmuls'] / 1e12:.3f}, attention {terms['attention'] / 1e12:.3f}, "
        f"LM head {terms['lm_head'] / 1e12:.3f}).",
        f"MFU = model FLOPs / median step time / matmul rate probed in the same run: "
        f"{', '.join(f'{x:.3g}' for x in probes['matmul_tflops'])} TFLOP/s (start, end; the best is used).",
        f"Peak extra: {cfg['memory_method']} beyond weights, optimizer state and inputs (gradients included); "
        "resident: weights + AdamW state.",
        "",
        *table(doc["rows"]),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("python -m bench.train_step", __doc__, quick="tiny model, seconds (CI)",
                          out="results root; files go to OUT/<device>/ (default: bench/results, "
                              "or a temporary folder with --quick)")
    parser.add_argument("--rows", type=int, help="rows a step (default: 8 GPU, 2 CPU, 2 quick)")
    parser.add_argument("--seq_len", type=int, help="tokens a row (default: 2048 GPU, 256 CPU, 128 quick)")
    parser.add_argument("--no_compile", action="store_true", help="do not run the torch.compile variants")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    setup = make_setup("quick" if opts.quick else "full", device)
    setup = replace(setup, rows=opts.rows or setup.rows, seq_len=opts.seq_len or setup.seq_len,
                    skip_compile="--no_compile given" if opts.no_compile else setup.skip_compile)
    doc = run(setup, device, log=lambda line: print(line, flush=True))
    paths, bad = write_checked(results_dir(opts.out, opts.quick, device), "train_step", doc, markdown, row_problem)
    return report(paths, f"{len(doc['rows'])} variants in {doc['wall_s']:.0f} s; "
                         f"{status_counts(doc['rows'], STATUSES)}", bad)


if __name__ == "__main__":
    sys.exit(main())
