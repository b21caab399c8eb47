"""One SEGA optimizer step in the repeated and the prefix-shared layout: time, peak memory, equal gradients.

    python -m bench.sega_prefix --out DIR            # embedded SmolLM2, fp32, CPU, 2 threads, P=512, R=64, k=4
    python -m bench.sega_prefix --quick --out DIR    # a tiny random Llama, seconds (tests)

A step is what ``gem_fast.train`` runs for one SEGA micro-batch once sampling is done (sampling is
not timed: the k candidates are random tokens of the full response length): the
:class:`~gem_fast.policy.PolicyLoss` forward with Eq. 2's token weights ``A_i / B``, backward,
AdamW step. ``repeated``: B·k rows of prompt + candidate; ``shared``: one packed row per prompt
(:mod:`gem_fast.prefix_sharing`). Both start from the same weights. The first (warm-up) step of
each gives the compared gradients and losses: ``max_rel_grad_diff`` is the largest, over parameter
tensors, of ``max|g_shared - g_repeated| / max|g_repeated|``, ``loss_diff`` is ``|loss_shared -
loss_repeated|``. Then timed steps, the two layouts interleaved, median time. Gradients are zeroed
in place, not freed, so parameters, gradients and AdamW state are resident before every timed
step: ``peak_mb`` is the peak resident memory during the step (CUDA: ``max_memory_allocated``)
minus what was resident just before it, the largest over the timed steps. On CUDA the step runs
under bf16 autocast as ``train()`` does (then the gradients agree to bf16, not 1e-4).
Writes ``DIR/sega_prefix.json`` and ``DIR/sega_prefix.md``.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .common import RepeatPolicy, bench_parser, environment, measure_interleaved, report, write_results
from gem_fast.data import EncodedBatch, join_prompt_and_generation
from gem_fast.models import tiny_llama
from gem_fast.policy import PolicyLoss
from gem_fast.prefix_sharing import pack_groups, resolve_prefix_sharing
from gem_fast.advantages import sega_token_weights
from gem_fast.plan.shapes import ModelShape

LAYOUTS = ("repeated", "shared")
QUICK_SHAPE = ModelShape("tiny Llama", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                         vocab=512, tied=True)
GOALS = {"time_ratio": 0.6, "peak_ratio": 0.6, "max_rel_grad_diff": 1e-4}


@dataclass(frozen=True)
class Case:
    """B prompts of ``prompt_len`` tokens, k candidates of ``response_len`` tokens each, ``reps`` timed steps."""

    prompts: int = 1
    prompt_len: int = 512
    response_len: int = 64
    k: int = 4
    reps: int = 3


QUICK = Case(prompts=2, prompt_len=48, response_len=8, k=3, reps=3)


def sega_batch(vocab: int, case: Case, device: torch.device, seed: int = 0) -> tuple[EncodedBatch, torch.Tensor]:
    """The repeated-layout rows [B·k, P+R] of random prompts and candidates, and their weights A_i / B
    [B·k, P+R-1] (zero-mean random advantages), as :class:`gem_fast.objectives.SEGA` builds them."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (case.prompts, case.prompt_len), generator=g)
    sequences = torch.randint(3, vocab, (case.prompts * case.k, case.response_len), generator=g)
    batch = join_prompt_and_generation(prompt_ids, torch.ones_like(prompt_ids), sequences,
                                       torch.ones_like(sequences, dtype=torch.bool))
    advantages = torch.randn(case.prompts, case.k, generator=g)
    advantages -= advantages.mean(-1, keepdim=True)
    weights = sega_token_weights(advantages, case.prompts, batch.input_ids.shape[1] - 1)
    return batch.to(device), weights.to(device)


def _rel_grad_diff(repeated: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]) -> float:
    return max(float((shared[n] - g).abs().max() / g.abs().max().clamp(min=torch.finfo(g.dtype).tiny))
               for n, g in repeated.items())


def run(model: torch.nn.Module, case: Case, device: torch.device, log=print) -> dict:
    """Both layouts of one SEGA step on copies of ``model`` (see the module doc); the JSON document."""
    batch, weights = sega_batch(model.config.vocab_size, case, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    policies, optimizers, first_loss, first_grads = {}, {}, {}, {}
    for layout in LAYOUTS:
        replica = copy.deepcopy(model).train()
        shared = layout == "shared" and resolve_prefix_sharing("on", replica, "sega", device)
        policies[layout] = PolicyLoss(replica, backend="auto", prefix_sharing=shared)
        optimizers[layout] = torch.optim.AdamW(policies[layout].parameters(), lr=1e-5)

    def step(layout: str) -> torch.Tensor:
        with autocast:
            loss = policies[layout](batch.input_ids, batch.attention_mask, batch.response_mask, weights)
        loss.backward()
        return loss.detach()

    def optimizer_step(layout: str) -> None:
        optimizers[layout].step()
        optimizers[layout].zero_grad(set_to_none=False)  # gradients stay resident, as the weights and AdamW state

    for layout in LAYOUTS:  # warm-up: the same weights in both layouts, so these gradients are compared
        began = time.perf_counter()
        first_loss[layout] = float(step(layout))
        first_grads[layout] = {n: p.grad.detach().float().clone() for n, p in policies[layout].named_parameters()}
        optimizer_step(layout)
        log(f"{layout}: warm-up step {time.perf_counter() - began:.2f} s, loss {first_loss[layout]:.6g}")
    max_rel = _rel_grad_diff(first_grads["repeated"], first_grads["shared"])
    del first_grads

    def timed(layout: str):
        return lambda: (step(layout), optimizer_step(layout))

    samples = measure_interleaved({layout: timed(layout) for layout in LAYOUTS}, device,
                                  RepeatPolicy(warmup=0, min_reps=case.reps, max_reps=case.reps, budget_s=0.0),
                                  raise_errors=True)
    tokens = {"repeated": int(batch.attention_mask.sum()), "shared": pack_groups(batch).tokens}
    doc: dict = {}
    for layout in LAYOUTS:
        peaks = [s.peak_bytes for s in samples[layout] if s.peak_bytes is not None]
        doc[layout] = {"step_s": statistics.median(s.seconds for s in samples[layout]),
                       "peak_mb": max(peaks) / 2**20 if peaks else None, "tokens": tokens[layout],
                       "times_s": [s.seconds for s in samples[layout]], "first_loss": first_loss[layout]}
        log(f"{layout}: median {doc[layout]['step_s']:.3f} s of {doc[layout]['times_s']}, "
            f"peak {doc[layout]['peak_mb']} MB, {tokens[layout]} tokens")
    doc["max_rel_grad_diff"] = max_rel
    doc["loss_diff"] = abs(first_loss["shared"] - first_loss["repeated"])
    doc["time_ratio"] = doc["shared"]["step_s"] / doc["repeated"]["step_s"]
    doc["peak_ratio"] = (doc["shared"]["peak_mb"] / doc["repeated"]["peak_mb"]
                         if doc["shared"]["peak_mb"] is not None and doc["repeated"]["peak_mb"] else None)
    doc["goals"] = GOALS
    doc["case"] = asdict(case)
    doc["model"] = {"type": model.config.model_type, "params": sum(p.numel() for p in model.parameters()),
                    "attention": policies["shared"].model.config._attn_implementation,
                    "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                    "autocast": "bf16" if device.type == "cuda" else None}
    doc["environment"] = environment(device)
    return doc


def table(doc: dict) -> list[str]:
    """The markdown rows of ``doc``: one per layout, then the agreement line."""
    lines = ["| layout | tokens | step s (median) | peak MB |", "|---|---:|---:|---:|"]
    for layout in LAYOUTS:
        r = doc[layout]
        peak = f"{r['peak_mb']:,.0f}" if r["peak_mb"] is not None else "n/a"
        lines.append(f"| {layout} | {r['tokens']:,} | {r['step_s']:.3f} | {peak} |")
    peak_ratio = f"{doc['peak_ratio']:.2f}" if doc["peak_ratio"] is not None else "n/a"
    lines += ["", f"shared / repeated: time {doc['time_ratio']:.2f}, peak {peak_ratio}; max_rel_grad_diff "
                  f"{doc['max_rel_grad_diff']:.2e}, loss_diff {doc['loss_diff']:.2e}"]
    return lines


def markdown(doc: dict) -> str:
    c, m = doc["case"], doc["model"]
    head = (f"# SEGA step, repeated vs prefix-shared layout\n\n{m['type']} ({m['params'] / 1e6:,.0f} M parameters, "
            f"{m['dtype']}, attention `{m['attention']}`) on {doc['environment']['device']}, "
            f"{doc['environment']['cpu_threads']} threads; {c['prompts']} prompt(s) of {c['prompt_len']} tokens, "
            f"k={c['k']} candidates of {c['response_len']} tokens; forward, backward, AdamW; median of {c['reps']} "
            "after a warm-up. Peak: beyond weights, gradients and AdamW state"
            + (", gradients compared under bf16 autocast.\n\n" if m["autocast"] else ".\n\n"))
    return head + "\n".join(table(doc)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("python -m bench.sega_prefix", __doc__, quick="a tiny random Llama and short rows (seconds)",
                          device="cpu", out="folder for sega_prefix.json and sega_prefix.md", out_required=True,
                          threads=2)
    parser.add_argument("--reps", type=int, default=None, help="timed steps per layout (default 3)")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    case = QUICK if opts.quick else Case()
    if opts.reps is not None:
        if opts.reps < 1:
            parser.error(f"--reps must be >= 1, got {opts.reps}")
        case = Case(**{**asdict(case), "reps": opts.reps})
    if opts.quick:
        model = tiny_llama(shape=QUICK_SHAPE, init_std=0.02, device=device)
    else:
        from gem_fast.models import load_model

        model = load_model(None, device=device)  # the embedded SmolLM2-135M, fp32
    doc = run(model, case, device)
    return report(write_results(opts.out, "sega_prefix", doc, markdown(doc)), "\n".join(table(doc)))


if __name__ == "__main__":
    sys.exit(main())
