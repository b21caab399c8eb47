"""Training metrics, one path: :class:`Reporter` sends each optimizer step's record to its sinks.

The sinks: ``<out_dir>/metrics.jsonl`` (one JSON record per step, through :class:`JsonlLog`), the
console line (``--progress``), and TensorBoard or Weights & Biases (``--report_to``) as scalars at
the record's ``step``. Both of the last are optional dependencies, imported only when chosen:
TensorBoard through ``torch.utils.tensorboard`` (needs the ``tensorboard`` package; events under
``<out_dir>/tensorboard``), Weights & Biases through ``wandb`` (project ``$WANDB_PROJECT``, default
``gem_fast``; files under ``<out_dir>/wandb``). :func:`missing_package` lets a run stop before
any model loads when the chosen one is not installed.

:class:`JsonlLog` is the one resume-aware JSONL writer: ``metrics.jsonl`` and SEGA's ``samples.jsonl``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Protocol

from gem_fast.errors import UsageError

__all__ = ["REPORT_TO", "missing_package", "JsonlLog", "Reporter"]

logger = logging.getLogger(__name__)

REPORT_TO = ("none", "tensorboard", "wandb")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def missing_package(report_to: str) -> str | None:
    """Why ``report_to`` cannot run in this environment (one line, with the pip command), None when it can."""
    if report_to not in REPORT_TO:
        return f"report_to: expected one of {REPORT_TO}, got {report_to!r}"
    package = _PACKAGE.get(report_to)
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return f"report_to {report_to}: the {package!r} package is not installed (pip install {package})"


class JsonlLog:
    """An append-only JSON Lines file of step records (each a dict with an int ``step``), resume-aware:
    before its first line it drops the records a resumed run writes again (see :meth:`resume`).

    Each :meth:`write` opens, appends and closes: a killed run loses at most the line being written.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._resumed = False

    def resume(self, start: int) -> None:
        """Keep only the records of steps <= ``start`` (the steps a hard kill lost are written again);
        creates the file (and its folder) when absent.

        A torn last line (a kill mid-write) is dropped with a warning; an unreadable line elsewhere
        stops with :class:`~gem_fast.errors.UsageError` naming it.
        """
        self._resumed = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self.path.touch()
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):
                    raise UsageError(f"{self.path}:{number}: not a JSON record; repair or delete the line") from None
                logger.warning("%s:%d: dropped a torn last line (a run killed mid-write): %r", self.path, number, line)
                continue
            if record["step"] <= start:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` (one line each). Before the first write of a log not yet :meth:`resume`-d,
        the records of the first one's step and later ones go (a resumed run writes them again)."""
        if not self._resumed:
            self.resume(int(records[0]["step"]) - 1)
        with self.path.open("a") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in records)


def _console_line(record: dict[str, Any]) -> str:
    """One step's record as the console shows it: ``key value`` pairs, floats to 4 significant digits."""
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())


class _Sink(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class _TensorBoard:
    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.writer.add_text("train_config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.flush()  # a killed run keeps what metrics.jsonl keeps

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gem_fast"), dir=str(out_dir), config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log({f"train/{name}": value for name, value in scalars.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class Reporter:
    """Sends step records to every sink: ``metrics.jsonl`` and the console once :meth:`open`-ed, and the
    ``report_to`` sink ("none": nowhere), which opens with the first record, so a run that stops before
    its first step leaves no event files.

    ``config`` (flat field names) is attached to the run as its hyperparameters.
    Raises ``ValueError`` (see :func:`missing_package`) when the sink's package is not installed.
    """

    def __init__(self, report_to: str, out_dir: str | Path, config: dict[str, Any]) -> None:
        if why := missing_package(report_to):
            raise ValueError(why)
        self.report_to, self.out_dir, self.config = report_to, Path(out_dir), config
        self._sink: _Sink | None = None
        self._metrics: JsonlLog | None = None
        self._console: Callable[[str], None] | None = None

    def open(self, start: int, console: Callable[[str], None] | None = None) -> None:
        """Log to ``out_dir/metrics.jsonl`` from step ``start`` + 1 (later records a hard kill left are
        dropped, :meth:`JsonlLog.resume`) and, when given, one line per record (``key value`` pairs) to ``console``."""
        self._metrics = JsonlLog(self.out_dir / "metrics.jsonl")
        self._metrics.resume(start)
        self._console = console

    def log(self, record: dict[str, Any]) -> None:
        """One step's record: a line of metrics.jsonl and of the console, and its numeric values (``step``
        itself excluded) to the ``report_to`` sink at ``record["step"]``."""
        if self._metrics is not None:
            self._metrics.write([record])
        if self.report_to != "none":
            if self._sink is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self._sink = (_TensorBoard if self.report_to == "tensorboard" else _Wandb)(self.out_dir, self.config)
            scalars = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self._sink.log(scalars, int(record["step"]))
        if self._console is not None:
            self._console(_console_line(record))

    def close(self) -> None:
        """Flush and close the ``report_to`` sink (if one opened)."""
        if self._sink is not None:
            self._sink.close()
            self._sink = None
