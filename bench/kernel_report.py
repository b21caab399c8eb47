"""Checks, tables and plots of a :mod:`bench.kernels` results document.

Writers never drop a run for a bad row: :func:`write_outputs` marks it (``row["invalid"]``), the
tables show it as invalid and the plots leave it out.
"""

from __future__ import annotations

import math
from pathlib import Path

from .common import check_row, validate as common_validate, write_checked
from .kernel_ops import FLOPS_PER_NHV, MODES, OPS

STATUSES = ("ok", "not installed", "skipped", "error")
REQUIRED_ROW_FIELDS = (
    "op", "mode", "tokens", "vocab", "hidden", "dtype", "provider", "backend", "status",
    "time_ms", "repeats", "peak_extra_bytes", "throughput", "throughput_unit",
    "fraction_of_peak", "max_abs_err", "device",
)


def _ok_problem(row: dict) -> str | None:
    if not (isinstance(row["time_ms"], (int, float)) and row["time_ms"] > 0 and row["repeats"] > 0):
        return "ok without a positive time"
    err = row["max_abs_err"]
    if not row.get("error_check") and not (isinstance(err, (int, float)) and math.isfinite(err)):
        return "ok without a finite error"
    return None


def row_problem(row: dict) -> str | None:
    """What makes a kernel row incomplete or inconsistent (None: it is sound)."""
    return check_row(row, REQUIRED_ROW_FIELDS, STATUSES, _ok_problem)


def validate(doc: dict) -> None:
    """Raise ValueError unless ``doc`` is a complete results document with sound rows."""
    common_validate(doc, ("schema", "config", "environment", "probes", "providers", "rows"), row_problem)


def _ok(row: dict) -> bool:
    return row.get("status") == "ok" and "invalid" not in row


def _fmt_mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f}"


def table(rows: list[dict]) -> list[str]:
    """Markdown table of kernel rows, with each time as a multiple of gem_fast's at the same point."""
    lines = ["| op | mode | N | V | provider | backend | status | median ms | × gem_fast time | "
             "peak extra MB | throughput | % of matmul / copy | max abs err |",
             "|" + "---|" * 13]
    gem_time = {(r["op"], r["mode"], r["tokens"], r["vocab"]): r["time_ms"]
                for r in rows if r["provider"] == "gem_fast" and _ok(r)}
    for r in rows:
        key = (r.get("op"), r.get("mode"), r.get("tokens"), r.get("vocab"))
        if _ok(r):
            ratio = f"{r['time_ms'] / gem_time[key]:.2f}" if key in gem_time else "–"
            err = f"{r['max_abs_err']:.1e}" if r["max_abs_err"] is not None else "not checked"
            cells = [f"{r['time_ms']:,.2f}" + (" (1 run)" if r["repeats"] == 1 else ""), ratio,
                     _fmt_mb(r["peak_extra_bytes"]), f"{r['throughput']:.3g} {r['throughput_unit']}",
                     f"{100 * r['fraction_of_peak']:.0f} %", err]
            status = "ok"
        else:
            cells = ["–"] * 6
            why = r.get("invalid") and f"invalid: {r['invalid']}"
            status = why or f"{r.get('status')}: {r.get('reason') or r.get('error')}"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {r.get('provider')} | {r.get('backend')} | "
                     f"{status.replace('|', '/')} | " + " | ".join(cells) + " |")
    return lines


def headline_rows(doc: dict) -> list[dict]:
    """Every row at the config's headline shape."""
    tokens, vocab = doc["config"]["headline"]
    return [r for r in doc["rows"] if (r.get("tokens"), r.get("vocab")) == (tokens, vocab)]


def flops_note() -> str:
    counts = ", ".join(f"{op} {mode} {k}NHV" for (op, mode), k in FLOPS_PER_NHV.items())
    return (f"Throughput counts GEMM FLOPs per op, the same for every provider ({counts}), or for entropy "
            "the logits bytes read (and the gradient written).")


def markdown(doc: dict) -> str:
    env, probes, cfg = doc["environment"], doc["probes"], doc["config"]
    versions = ", ".join(f"{p['name']} {p['version'] or ('installed' if p['installed'] else 'not installed')}"
                         for p in doc["providers"] if p["name"] in ("liger", "cce"))
    load = f"; load average {env['loadavg']} → {env['loadavg_end']}" if env.get("loadavg") else ""
    sweeps = ", ".join(f"{s['name']} ({len(s['points'])} shape{'s' * (len(s['points']) > 1)}"
                       + (": one run each, for memory" if s["memory_only"] else "") + ")" for s in cfg["sweeps"])
    lines = [
        f"# gem_fast kernel benchmarks: {env['device']} ({env['date'][:10]})",
        "",
        f"Config `{cfg['name']}`: H={cfg['hidden']}, {cfg['dtype']}; torch {env['torch']}, triton {env['triton']}, "
        f"{versions}; {env['cpu_threads']} CPU threads{load}.",
        f"Sweeps: {sweeps}. At each point every provider gets a warm-up call, then the providers are timed "
        "round-robin (at least 3 runs each) and the median is reported; torch.compile compiles once per point "
        "with static shapes, only at " + (", ".join(f"N={n}, V={v}" for n, v in cfg["compile_at"]) or "no point")
        + (f" ({cfg['skip_compile']})" if cfg["skip_compile"] else "") + ".",
        f"Probes in the same run: matmul {', '.join(f'{x:.3g}' for x in probes['matmul_tflops'])} TFLOP/s, "
        f"copy {', '.join(f'{x:.3g}' for x in probes['copy_gbps'])} GB/s (start, end; fractions use the best).",
        f"Peak extra memory: {cfg['memory_method']}, beyond inputs, weights and returned gradients. "
        f"Error: max abs vs float64 on the first {cfg['err_tokens']} tokens. " + flops_note() + " "
        "`weighted_loss` uses unit token weights, i.e. the summed cross-entropy the peers compute.",
        "",
        f"## Headline (N={cfg['headline'][0]}, V={cfg['headline'][1]})",
        "",
        *table(headline_rows(doc)),
        "",
        "## All points",
        "",
        *table(doc["rows"]),
        "",
    ]
    return "\n".join(lines)


def plot(doc: dict, out_dir: Path) -> list[Path]:
    """Time and memory vs vocab (fixed N) and vs tokens (fixed V), log scales, one panel per op/mode.

    Time panels leave out the memory-only sweeps (single runs); memory panels draw every sweep on the axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    cfg = doc["config"]
    rows = [r for r in doc["rows"] if _ok(r)]
    colors = {p["name"]: f"C{i}" for i, p in enumerate(doc["providers"])}  # one colour per provider throughout
    single_runs = {s["name"] for s in cfg["sweeps"] if s["memory_only"]}
    metrics = {"time": ("time_ms", "median time (ms)"), "memory": ("peak_extra_bytes", "peak extra memory (MB)")}
    written = []
    for axis in ("vocab", "tokens"):
        sweeps = [s for s in cfg["sweeps"] if s["axis"] == axis]
        if not sweeps:
            continue
        fixed_key = "tokens" if axis == "vocab" else "vocab"
        for metric, (y_key, y_label) in metrics.items():
            # A point of the sweep may have been measured by an earlier sweep: select rows by shape.
            points = {tuple(p) for s in sweeps if metric == "memory" or not s["memory_only"] for p in s["points"]}
            fixed = {p[0] if axis == "vocab" else p[1] for p in points}
            fig, axes = plt.subplots(len(MODES), len(OPS), figsize=(15, 8), squeeze=False)
            for (i, mode), (j, op) in ((m, o) for m in enumerate(MODES) for o in enumerate(OPS)):
                ax = axes[i][j]
                sel = [r for r in rows if r["op"] == op and r["mode"] == mode and (r["tokens"], r["vocab"]) in points
                       and (metric == "memory" or r.get("sweep") not in single_runs) and r[y_key] is not None]
                for name in dict.fromkeys(r["provider"] for r in sel):
                    pts = sorted((r[axis], r[y_key]) for r in sel if r["provider"] == name)
                    ys = [y / 2**20 if metric == "memory" else y for _, y in pts]
                    ax.plot([x for x, _ in pts], ys, marker="o", label=name, color=colors.get(name))
                ax.set_xscale("log")
                ax.set_yscale("log", nonpositive="mask")  # a peak at or below the baseline is noise
                xs = sorted({r[axis] for r in sel})
                ax.set_xticks(xs, [str(x) for x in xs], rotation=30)
                ax.xaxis.set_minor_locator(ticker.NullLocator())
                ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
                ax.set_title(f"{op} {mode} ({fixed_key}={', '.join(map(str, sorted(fixed)))})", fontsize=10)
                ax.set_xlabel("vocab size V" if axis == "vocab" else "tokens N")
                ax.set_ylabel(y_label)
                ax.grid(True, which="both", alpha=0.3)
                if sel:
                    ax.legend(fontsize=8)
            env = doc["environment"]
            fig.suptitle(f"gem_fast {metric} vs {axis}: {env['device']}, {env['date'][:10]}, "
                         f"H={cfg['hidden']}, {cfg['dtype']}")
            fig.tight_layout()
            path = out_dir / f"{metric}_vs_{axis}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def write_outputs(doc: dict, out_dir: Path) -> tuple[list[Path], int]:
    """results.json, results.md and the PNG plots under ``out_dir``; returns them and how many rows
    were marked invalid (written all the same)."""
    paths, bad = write_checked(out_dir, "results", doc, markdown, row_problem)
    return [*paths, *plot(doc, out_dir)], bad
