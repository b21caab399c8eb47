"""results.md and suite.png of a GPU-suite run, from its results document alone (no torch: the driver imports it).

The per-stage tables are written by the stages themselves (each with its own benchmark's table code);
this module adds the summary around them and draws the one plot.
"""

from __future__ import annotations

from pathlib import Path


def _ok_rows(doc: dict, stage: str) -> list[dict]:
    record = next((r for r in doc["stages"] if r["name"] == stage), None)
    rows = record["rows"] if record else []
    return [r for r in rows if r.get("status") == "ok" and "invalid" not in r]


def markdown(doc: dict) -> str:
    """The summary table of the stages, then each stage's own section."""
    facts = doc["suite"]
    versions = ", ".join(f"{name.replace('_', '-')} {facts[name] or 'not installed'}"
                         for name in ("torch", "triton", "transformers", "liger_kernel", "cut_cross_entropy"))
    lines = [
        f"# GPU suite: {facts['device']} ({facts['date'][:10]})" + (" (dry run, tiny sizes on a CPU)"
                                                                      if facts["dry_run"] else ""),
        "",
        f"{versions}; Python {facts['python']}. Command: `{facts['command']}`. "
        f"Results belong in `{facts['results_dir']}/`.",
        "",
        "| stage | status | seconds | time box s | rows | reason |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["stages"]:
        reason = (r["reason"] or "").replace("|", "/")
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {r['box_s']} | {len(r['rows'])} "
                     f"| {reason} |")
    for r in doc["stages"]:
        lines += ["", f"## {r['name']}", ""]
        if r["markdown"]:
            lines.append(r["markdown"])
        elif r["status"] == "skipped":
            lines.append(f"Skipped: {r['reason']}")
        else:
            lines.append(f"No table: the stage ended with `{r['status']}` before writing it; "
                         f"its {len(r['rows'])} rows are in results.json.")
    return "\n".join(lines) + "\n"


def _bars(ax, groups: dict[str, dict[str, float]], ylabel: str, *, log: bool = False) -> None:
    """Grouped bars: one group per key of ``groups``, one bar per series inside it."""
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        xs = [g + i * width for g, values in enumerate(groups.values()) if name in values]
        ax.bar(xs, [values[name] for values in groups.values() if name in values], width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)


def plot(doc: dict, path: Path) -> Path:
    """One PNG, four panels: kernel time and memory at the headline shape, training tokens/s, sampling time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    record = next((r for r in doc["stages"] if r["name"] == "kernels"), None)
    headline = tuple(record["meta"]["config"]["headline"]) if record and "config" in record["meta"] else None
    kernel_rows = [r for r in _ok_rows(doc, "kernels") if (r["tokens"], r["vocab"]) == headline]
    title = f"kernels at N={headline[0]}, V={headline[1]}" if headline else "kernels"
    for ax, label, key, scale in ((axes[0][0], "median time (ms)", "time_ms", 1.0),
                                  (axes[0][1], "peak extra memory (MiB)", "peak_extra_bytes", 2**-20)):
        groups: dict[str, dict[str, float]] = {}
        for r in kernel_rows:
            if r[key] is not None and r[key] > 0:  # a peak at or below the baseline is noise on a log scale
                groups.setdefault(f"{r['op']} {r['mode']}", {})[r["provider"]] = r[key] * scale
        _draw(ax, groups, label, title, log=True)
    steps = {r["variant"]: r["tokens_per_s"] for r in _ok_rows(doc, "train_step")}
    _draw(axes[1][0], {"tokens/s": steps} if steps else {}, "tokens / s", "training step")
    sampling: dict[str, dict[str, float]] = {}
    for r in _ok_rows(doc, "sampling"):
        sampling.setdefault(f"k={r['k']}", {})[r["method"]] = r["median_s"]
    _draw(axes[1][1], sampling, "median s", "group sampling")
    facts = doc["suite"]
    fig.suptitle(f"GPU suite: {facts['device']}, {facts['date'][:10]}" + (" (dry run)" if facts["dry_run"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _draw(ax, groups: dict[str, dict[str, float]], ylabel: str, title: str, *, log: bool = False) -> None:
    ax.set_title(title, fontsize=10)
    if not groups:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    _bars(ax, groups, ylabel, log=log)
