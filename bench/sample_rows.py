"""One sampling step of ``[R, V]`` logits: ``sample_tokens`` (torch, triton) vs separate torch ops.

    python -m bench.sample_rows --out DIR            # CPU: the torch backend and the separate ops
    python -m bench.sample_rows --device cuda --out DIR   # + the triton backend
    python -m bench.sample_rows --quick --out DIR    # tiny shapes, Triton interpreted (tests, dry run)

A step is what a decode loop does with the last position's logits: the token (temperature 1, top-p 1
or 0.9) and the softmax entropy of the row. Providers: ``gem_fast:torch`` and ``gem_fast:triton``
(:func:`gem_fast.kernels.sample_tokens`), and ``torch_ops``, the separate ops a sampler writes
without it: ``softmax``, the entropy from ``log_softmax``, and ``torch.multinomial`` on the
probabilities, after a full sort, cumulative sum and scatter for top-p (what HF's top-p warper
and ``gem_fast.sampling`` before this op do). Cases R x V x dtype x top_p, providers interleaved,
median of the timed calls; ``read_gbps`` is the logits' bytes over that median (the op's floor is
one read of them). ``agree`` is the fraction of rows where the triton backend drew the torch
backend's token (same seed and step; the same noise, so 1.0 up to float ties).
Writes ``DIR/sample_rows.json`` and ``DIR/sample_rows.md``.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch

# The triton backend runs on a CPU only through the interpreter, chosen before any @triton.jit is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .common import RepeatPolicy, bench_parser, environment, measure_interleaved, report, write_results  # noqa: E402

PROVIDERS = ("gem_fast:torch", "gem_fast:triton", "torch_ops")


@dataclass(frozen=True)
class Setup:
    """The cases (every combination of rows, vocabs, dtypes, top_ps) and how each is timed."""

    rows: tuple[int, ...]
    vocabs: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    top_ps: tuple[float, ...]
    providers: tuple[str, ...]
    policy: RepeatPolicy
    temperature: float = 1.0


def make_setup(kind: str, device: torch.device) -> Setup:
    """``full``: R in {4, 32}, V in {49152, 128256}, bf16 and fp32, top-p 1 and 0.9; ``quick``: tiny.
    The triton backend runs on CUDA, and interpreted in ``quick`` (where it is cheap)."""
    triton = device.type == "cuda" or kind == "quick"
    providers = tuple(p for p in PROVIDERS if triton or p != "gem_fast:triton")
    if kind == "quick":
        return Setup(rows=(2,), vocabs=(300,), dtypes=(torch.float32,), top_ps=(0.9,), providers=providers,
                     policy=RepeatPolicy(warmup=1, min_reps=1, max_reps=1, budget_s=0.0))
    if kind != "full":
        raise ValueError(f"kind: expected 'full' or 'quick', got {kind!r}")
    budget = 0.02 if device.type == "cuda" else 0.5
    return Setup(rows=(4, 32), vocabs=(49152, 128256), dtypes=(torch.bfloat16, torch.float32), top_ps=(1.0, 0.9),
                 providers=providers, policy=RepeatPolicy(warmup=2, min_reps=5, max_reps=200, budget_s=budget))


def separate_ops(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain torch sampler: (tokens [R], entropy [R]) from softmax, log_softmax, sort and multinomial."""
    z = logits.float() / temperature
    log_probs = torch.log_softmax(z, dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).nan_to_num_(0.0).sum(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted), 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1), entropy


def _calls(logits: torch.Tensor, setup: Setup, top_p: float) -> dict[str, Callable[[], object]]:
    from gem_fast.kernels import sample_tokens

    seed = torch.tensor(0, dtype=torch.int64, device=logits.device)
    step = torch.zeros((), dtype=torch.int64, device=logits.device)
    generator = torch.Generator(device=logits.device).manual_seed(0)

    def ours(backend: str) -> Callable[[], object]:
        return lambda: sample_tokens(logits, seed, step.add_(1), temperature=setup.temperature, top_p=top_p,
                                     backend=backend)

    every = {"gem_fast:torch": ours("torch"), "gem_fast:triton": ours("triton"),
             "torch_ops": lambda: separate_ops(logits, setup.temperature, top_p, generator)}
    return {name: every[name] for name in setup.providers}


def _agreement(logits: torch.Tensor, setup: Setup, top_p: float) -> float | None:
    if "gem_fast:triton" not in setup.providers:
        return None
    from gem_fast.kernels import sample_tokens

    seed, step = (torch.tensor(v, dtype=torch.int64, device=logits.device) for v in (7, 3))
    tokens = [sample_tokens(logits, seed, step, temperature=setup.temperature, top_p=top_p, backend=b)[0]
              for b in ("torch", "triton")]
    return float((tokens[0] == tokens[1]).float().mean())


def run(setup: Setup, device: torch.device, log: Callable[[str], None] = print,
        emit: Callable[[dict], None] = lambda row: None) -> dict:
    """Every case of ``setup`` on ``device``; ``emit`` gets each row as it is measured. The JSON document."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for n_rows, vocab, dtype in itertools.product(setup.rows, setup.vocabs, setup.dtypes):
        # Logits of a trained model's spread (a few units) so that top-p 0.9 keeps a real fraction of V.
        logits = (torch.randn(n_rows, vocab, generator=gen) * 2.0).to(device=device, dtype=dtype)
        for top_p in setup.top_ps:
            samples = measure_interleaved(_calls(logits, setup, top_p), device, setup.policy)
            agree = _agreement(logits, setup, top_p)
            for provider, got in samples.items():
                row = {"provider": provider, "rows": n_rows, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."),
                       "top_p": top_p, "temperature": setup.temperature}
                if isinstance(got, str):
                    row.update(status="error", error=got)
                else:
                    median = statistics.median(s.seconds for s in got)
                    row.update(status="ok", median_ms=median * 1e3, times_ms=[s.seconds * 1e3 for s in got],
                               read_gbps=logits.numel() * logits.element_size() / median / 1e9,
                               agree=agree if provider == "gem_fast:triton" else None)
                rows.append(row)
                emit(row)
                log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                             if k != "times_ms"))
    setup_doc = {k: [str(d).removeprefix("torch.") for d in v] if k == "dtypes" else v
                 for k, v in asdict(setup).items()}
    return {"rows": rows, "setup": setup_doc, "environment": environment(device)}


def table(rows: list[dict]) -> list[str]:
    """Markdown: one line per case, each provider's median ms, and the op's speed-up over the separate ops."""
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    lines = ["| R | V | dtype | top-p | " + " | ".join(f"{p} ms" for p in providers)
             + " | torch_ops / best gem_fast | triton agrees |",
             "|---:|---:|---|---:|" + "---:|" * len(providers) + "---:|---:|"]
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cases.setdefault((r["rows"], r["vocab"], r["dtype"], r["top_p"]), {})[r["provider"]] = r
    for (n_rows, vocab, dtype, top_p), by in cases.items():
        ms = {p: by[p]["median_ms"] if by.get(p, {}).get("status") == "ok" else None for p in providers}
        cells = [f"{ms[p]:.3f}" if ms[p] is not None else by.get(p, {}).get("error", "–")[:40] for p in providers]
        ours = [v for p, v in ms.items() if p.startswith("gem_fast") and v is not None]
        ratio = f"{ms['torch_ops'] / min(ours):.2f}" if ours and ms.get("torch_ops") else "–"
        agree = by.get("gem_fast:triton", {}).get("agree")
        lines.append(f"| {n_rows} | {vocab:,} | {dtype} | {top_p} | " + " | ".join(cells) + f" | {ratio} | "
                     + (f"{agree:.3f}" if agree is not None else "–") + " |")
    return lines


def markdown(doc: dict) -> str:
    env = doc["environment"]
    load = f", load average {env['loadavg'][0]:.1f} at the end" if env.get("loadavg") else ""
    head = (f"# One sampling step: sample_tokens vs separate torch ops\n\n{env['device']}, torch {env['torch']}, "
            f"{env['cpu_threads']} threads{load}; temperature {doc['setup']['temperature']}, median of the timed "
            "calls (providers interleaved); torch_ops = softmax, entropy from log_softmax, sort + cumsum for top-p, "
            "torch.multinomial. `triton agrees`: the fraction of rows where the triton backend drew the torch "
            "backend's token.\n\n")
    return head + "\n".join(table(doc["rows"])) + "\n"


def main(argv: list[str] | None = None) -> int:
    opts = bench_parser("python -m bench.sample_rows", __doc__, quick="tiny shapes (seconds)", device="cpu",
                        out="folder for sample_rows.json and sample_rows.md", out_required=True, threads=2
                        ).parse_args(argv)
    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    doc = run(make_setup("quick" if opts.quick else "full", device), device)
    return report(write_results(opts.out, "sample_rows", doc, markdown(doc)), "\n".join(table(doc["rows"])))


if __name__ == "__main__":
    sys.exit(main())
