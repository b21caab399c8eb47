"""Group sampling: gem_fast.sampling.sample_group vs HF ``generate(num_return_sequences=k)``.

Same prompts, same sampling settings (temperature 1, no top-p, no top-k, exactly
``--new_tokens`` tokens per candidate: EOS is disabled on both sides), so the work differs
only in how the prompt is handled: HF repeats each prompt k times before prefill;
``sample_group`` prefills it once and reuses its KV cache (``shared_prefix``: one copy of the
prompt K/V; ``expand``: the cache repeated k times after prefill).

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
from pathlib import Path
from typing import Callable

import torch

from bench.common import RepeatPolicy, device_slug, environment, measure_interleaved
from gem_fast.models import load_model_and_tokenizer
from gem_fast.sampling import sample_group

METHODS = ("hf_generate", "expand", "shared_prefix")
RESULTS = Path(__file__).resolve().parent / "results"


def prompts(tokenizer, batch: int, prompt_len: int, seed: int) -> torch.Tensor:
    """[batch, prompt_len] random ordinary-token ids (no padding: every prompt is exactly prompt_len)."""
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    return ordinary[torch.randint(len(ordinary), (batch, prompt_len), generator=gen)]


def _prompt_kv_bytes_hf(model, rows: int, prompt_len: int) -> int:
    """Prompt K/V bytes HF holds: every one of the B*k rows keeps its own copy (computed, not measured)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * rows * kv_heads * prompt_len * head_dim * element


def compare(model, input_ids: torch.Tensor, *, k: int, new_tokens: int, rounds: int, methods: list[str], seed: int,
            pad_token_id: int | None, log: Callable[[str], None] = print) -> dict:
    """Time each of ``methods`` drawing ``k`` candidates of exactly ``new_tokens`` tokens for each prompt of
    ``input_ids`` [B, P] (no padding); methods interleaved, one warm-up each, then ``rounds`` timed runs.

    Returns ``{"methods": {name: seconds, median_s, peak_bytes, prompt_kv_bytes...}}`` plus, when
    ``hf_generate`` ran, each other method's time ratio to it (of medians and the median per round).
    """
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    attention_mask = torch.ones_like(input_ids)
    gen_device = device if device.type == "cuda" else "cpu"
    kv_bytes: dict[str, int] = {}

    def run(method: str) -> None:
        generator = torch.Generator(gen_device).manual_seed(seed)
        if method == "hf_generate":
            torch.manual_seed(seed)  # generate draws from the global RNG
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                num_return_sequences=k,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=pad_token_id,
            )
            assert out.shape == (batch * k, prompt_len + new_tokens), out.shape
            kv_bytes[method] = _prompt_kv_bytes_hf(model, batch * k, prompt_len)
        else:
            out = sample_group(
                model, input_ids, attention_mask, k=k, max_new_tokens=new_tokens, temperature=1.0,
                generator=generator, strategy=method, progress=False,
            )
            assert out.strategy == method and out.sequences.shape == (batch * k, new_tokens)
            kv_bytes[method] = out.prompt_kv_bytes

    policy = RepeatPolicy(warmup=1, min_reps=rounds, max_reps=rounds, budget_s=0.0)
    with torch.no_grad():
        samples = measure_interleaved({m: functools.partial(run, m) for m in methods}, device, policy,
                                      raise_errors=True)
    for method, got in samples.items():
        log(f"k={k} {method}: " + ", ".join(f"{s.seconds:.2f}" for s in got) + " s")
    result: dict = {
        "methods": {
            m: {
                "seconds": [s.seconds for s in samples[m]],
                "median_s": statistics.median(s.seconds for s in samples[m]),
                "peak_bytes": [s.peak_bytes for s in samples[m]],
                "prompt_kv_bytes": kv_bytes[m],
                "prompt_kv_bytes_source": "computed" if m == "hf_generate" else "measured (GroupSample)",
            }
            for m in methods
        },
    }
    if "hf_generate" in methods:
        hf = result["methods"]["hf_generate"]["median_s"]
        others = [m for m in methods if m != "hf_generate"]
        result["ratio_vs_hf"] = {m: result["methods"][m]["median_s"] / hf for m in others}
        # Rounds are interleaved, so a per-round ratio cancels load drift between rounds on a shared machine.
        per_round = {
            m: [a.seconds / b.seconds for a, b in zip(samples[m], samples["hf_generate"])] for m in others
        }
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
        "median per round) | peak MiB (median) | prompt KV MiB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
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
            f"| {peak} | {m['prompt_kv_bytes'] / 2**20:.1f} |\n"
        )
    new_file = not path.exists() or path.stat().st_size == 0
    with path.open("a") as f:
        f.writelines(([header] if new_file else []) + lines)


if __name__ == "__main__":
    main()
