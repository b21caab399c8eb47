"""Group sampling: gem_fast.sampling.sample_group vs HF ``generate(num_return_sequences=k)``.

Same prompts, same sampling settings (temperature 1, no top-p, no top-k, exactly
``--new_tokens`` tokens per candidate: EOS is disabled on both sides), so the work differs
only in how the prompt is handled and how a decode step runs: HF repeats each prompt k times
before prefill (``hf_generate``: eager, dynamic cache; ``hf_static_compile``: its static cache
and the forward under ``torch.compile``, mode reduce-overhead, HF's own fast path);
``sample_group`` prefills it once and reuses its KV cache (``shared_prefix``: one copy of the
prompt K/V; ``expand``: the cache repeated k times after prefill; ``static``: static shapes,
one CUDA graph replayed per step on CUDA).

Besides the time of a whole call, each method also runs with one new token (its prefill and
first draw) in the same rounds, so ``decode_ms_per_step`` = (call - one-token call) / (new - 1)
is the cost of one decode step; ``limit_ms_per_step`` is the least a step can cost: the bytes
it must read (weights, the prompt K/V once per prompt, each row's generated K/V at mid-decode)
over the copy rate measured in the same run. ``first_call_s`` is the warm-up call (compile and
capture included), reported apart from the medians.

    python -m bench.sampling                      # CPU, embedded SmolLM2, P=512, k=4, 64 new tokens
    python -m bench.sampling --device cuda --dtype bfloat16 --batch 8

Writes ``bench/results/<device>/sampling.json`` (every run, appended) and appends a markdown
row to ``bench/results/<device>/sampling.md``. Methods run interleaved, round by round, so
load drifts on a shared machine hit all of them alike; the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from bench.common import RepeatPolicy, copy_gbps, device_slug, environment, measure_interleaved
from gem_fast.models import load_model_and_tokenizer
from gem_fast.sampling import sample_group

METHODS = ("hf_generate", "hf_static_compile", "expand", "shared_prefix", "static")
HF_METHODS = ("hf_generate", "hf_static_compile")
RESULTS = Path(__file__).resolve().parent / "results"


def prompts(tokenizer, batch: int, prompt_len: int, seed: int) -> torch.Tensor:
    """[batch, prompt_len] random ordinary-token ids (no padding: every prompt is exactly prompt_len)."""
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    return ordinary[torch.randint(len(ordinary), (batch, prompt_len), generator=gen)]


def _kv_bytes_per_token(model) -> int:
    """K and V bytes of one token over all layers, in the model's dtype."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()


def step_bytes(model, batch: int, k: int, prompt_len: int, new_tokens: int) -> int:
    """The least a decode step must read: every weight once, each prompt's K/V once, and each of the B*k rows'
    generated K/V at mid-decode (new_tokens / 2 tokens)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + _kv_bytes_per_token(model) * (batch * prompt_len + batch * k * new_tokens // 2)


def _generate(model, input_ids, attention_mask, method: str, k: int, new_tokens: int, pad_token_id) -> torch.Tensor:
    """HF ``generate`` drawing exactly ``new_tokens`` per row; ``hf_static_compile`` adds its static cache and
    compiled forward (HF compiles only on accelerators unless told to: on the CPU it is told to)."""
    from transformers.generation import CompileConfig

    static = {}
    if method == "hf_static_compile":
        compile_config = CompileConfig()
        compile_config._compile_all_devices = input_ids.device.type != "cuda"
        static = {"cache_implementation": "static", "compile_config": compile_config}
    return model.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
        num_return_sequences=k, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id,
        **static,
    )


def compare(model, input_ids: torch.Tensor, *, k: int, new_tokens: int, rounds: int, methods: list[str], seed: int,
            pad_token_id: int | None, log: Callable[[str], None] = print) -> dict:
    """Time each of ``methods`` drawing ``k`` candidates of exactly ``new_tokens`` tokens for each prompt of
    ``input_ids`` [B, P] (no padding), and of one token; all interleaved, one warm-up each, then ``rounds``
    timed runs.

    Returns ``{"methods": {name: seconds, median_s, first_call_s, decode_ms_per_step, peak_bytes,
    prompt_kv_bytes...}, "limit_ms_per_step", "copy_gbps"}`` plus, when ``hf_generate`` ran, each other
    method's time ratio to it (of medians and the median per round).
    """
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    attention_mask = torch.ones_like(input_ids)
    gen_device = device if device.type == "cuda" else "cpu"
    kv_bytes: dict[str, int] = {}
    first_call_s: dict[str, float] = {}

    def run(method: str, new: int) -> None:
        began = time.perf_counter()
        generator = torch.Generator(gen_device).manual_seed(seed)
        if method in HF_METHODS:
            torch.manual_seed(seed)  # generate draws from the global RNG
            out = _generate(model, input_ids, attention_mask, method, k, new, pad_token_id)
            assert out.shape == (batch * k, prompt_len + new), out.shape
            kv_bytes[method] = _kv_bytes_per_token(model) * batch * k * prompt_len  # every row's own copy
        else:
            out = sample_group(
                model, input_ids, attention_mask, k=k, max_new_tokens=new, temperature=1.0,
                generator=generator, strategy=method, progress=False,
            )
            assert out.strategy == method and out.sequences.shape == (batch * k, new)
            kv_bytes[method] = out.prompt_kv_bytes
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_call_s.setdefault(f"{method}@{new}", time.perf_counter() - began)

    calls = {f"{m}@{n}": functools.partial(run, m, n) for m in methods for n in (new_tokens, 1)}
    policy = RepeatPolicy(warmup=1, min_reps=rounds, max_reps=rounds, budget_s=0.0)
    rate = copy_gbps(device, 2**28 if device.type == "cuda" else 2**26)
    with torch.no_grad():
        samples = measure_interleaved(calls, device, policy, raise_errors=True)
    limit_ms = step_bytes(model, batch, k, prompt_len, new_tokens) / (rate * 1e9) * 1e3
    result: dict = {"methods": {}, "copy_gbps": rate, "step_bytes": step_bytes(model, batch, k, prompt_len, new_tokens),
                    "limit_ms_per_step": limit_ms}
    for m in methods:
        full, one = samples[f"{m}@{new_tokens}"], samples[f"{m}@1"]
        median = statistics.median(s.seconds for s in full)
        decode_ms = (median - statistics.median(s.seconds for s in one)) / max(1, new_tokens - 1) * 1e3
        log(f"k={k} {m}: " + ", ".join(f"{s.seconds:.2f}" for s in full) + f" s; first call "
            f"{first_call_s[f'{m}@{new_tokens}']:.2f} s; decode {decode_ms:.2f} ms/step (limit {limit_ms:.3f})")
        result["methods"][m] = {
            "seconds": [s.seconds for s in full],
            "median_s": median,
            "first_call_s": first_call_s[f"{m}@{new_tokens}"],
            "one_token_s": [s.seconds for s in one],
            "decode_ms_per_step": decode_ms,
            "peak_bytes": [s.peak_bytes for s in full],
            "prompt_kv_bytes": kv_bytes[m],
            "prompt_kv_bytes_source": "computed" if m in HF_METHODS else "measured (GroupSample)",
        }
    if "hf_generate" in methods:
        hf = result["methods"]["hf_generate"]["median_s"]
        others = [m for m in methods if m != "hf_generate"]
        result["ratio_vs_hf"] = {m: result["methods"][m]["median_s"] / hf for m in others}
        # Rounds are interleaved, so a per-round ratio cancels load drift between rounds on a shared machine.
        reference = samples[f"hf_generate@{new_tokens}"]
        per_round = {m: [a.seconds / b.seconds for a, b in zip(samples[f"{m}@{new_tokens}"], reference)]
                     for m in others}
        result["ratio_vs_hf_per_round"] = per_round
        result["ratio_vs_hf_median_of_rounds"] = {m: statistics.median(r) for m, r in per_round.items()}
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF folder, .gguf file or Hub id (default: embedded SmolLM2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--batch", type=int, default=1, help="prompts B")
    parser.add_argument("--prompt_len", "--prompt-len", type=int, default=512)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--new_tokens", "--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per method (after one warm-up)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def run(args: argparse.Namespace, device: torch.device, methods: list[str]) -> dict:
    """Load the model, draw the prompts and :func:`compare` the methods; the result document."""
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype, device=device)
    input_ids = prompts(tokenizer, args.batch, args.prompt_len, args.seed).to(device)
    return {
        "benchmark": "sampling",
        "model": args.model or "embedded SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)",
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "k": args.k,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        **compare(model, input_ids, k=args.k, new_tokens=args.new_tokens, rounds=args.rounds, methods=methods,
                  seed=args.seed, pad_token_id=tokenizer.pad_token_id,
                  log=lambda line: print(line, flush=True)),
        "environment": environment(device),
    }


def append_results(folder: Path, result: dict) -> None:
    """Append ``result`` to ``sampling.json`` (every run kept) and its rows to ``sampling.md`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "sampling.json"
    runs = json.loads(json_path.read_text()) if json_path.exists() else []
    json_path.write_text(json.dumps(runs + [result], indent=2) + "\n")
    _append_markdown(folder / "sampling.md", result)


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        parser.error(f"--methods: unknown {sorted(unknown)}, choose from {METHODS}")
    device = torch.device(args.device)
    result = run(args, device, methods)
    append_results(args.out / device_slug(device), result)
    medians = {m: result["methods"][m]["median_s"] for m in methods}
    print(json.dumps(medians | {k_: result.get(k_) for k_ in ("ratio_vs_hf", "ratio_vs_hf_median_of_rounds")}))


def _append_markdown(path: Path, r: dict) -> None:
    header = (
        "| date | device | threads | dtype | B | P | k | new | method | median s | ratio vs HF (of medians / "
        "median per round) | first call s | decode ms/step | limit ms/step | peak MiB (median) | prompt KV MiB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for method, m in r["methods"].items():
        peaks = [p for p in m["peak_bytes"] if p is not None]
        peak = f"{statistics.median(peaks) / 2**20:.0f}" if peaks else "n/a"
        if method == "hf_generate":
            ratio = "1.00"
        elif "ratio_vs_hf" in r:
            ratio = f"{r['ratio_vs_hf'][method]:.2f} / {r['ratio_vs_hf_median_of_rounds'][method]:.2f}"
        else:
            ratio = "n/a"
        env = r["environment"]
        lines.append(
            f"| {env['date'][:10]} | {env['device']} | {env['cpu_threads']} | {r['dtype']} | {r['batch']} "
            f"| {r['prompt_len']} | {r['k']} | {r['new_tokens']} | {method} | {m['median_s']:.2f} | {ratio} "
            f"| {m['first_call_s']:.1f} | {m['decode_ms_per_step']:.1f} | {r['limit_ms_per_step']:.2f} "
            f"| {peak} | {m['prompt_kv_bytes'] / 2**20:.1f} |\n"
        )
    text = path.read_text() if path.exists() else ""
    # A new table when the columns changed since the file's last one.
    last_header = text[text.rfind("| date |"):].split("\n", 1)[0] + "\n" if "| date |" in text else ""
    if last_header != header.split("\n", 1)[0] + "\n":
        lines.insert(0, ("\n" if text else "") + header)
    with path.open("a") as f:
        f.writelines(lines)


if __name__ == "__main__":
    main()
