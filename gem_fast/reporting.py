"""Training metrics beside ``metrics.jsonl``: TensorBoard or Weights & Biases (``--report_to``).

Each optimizer step's record (the dict one line of ``metrics.jsonl`` holds) goes to the chosen
sink as scalars at its ``step``. Both sinks are optional dependencies, imported only when chosen:
TensorBoard through ``torch.utils.tensorboard`` (needs the ``tensorboard`` package; events under
``<out_dir>/tensorboard``), Weights & Biases through ``wandb`` (project ``$WANDB_PROJECT``, default
``gem_fast``; files under ``<out_dir>/wandb``). :func:`missing_package` lets a run stop before
any model loads when the chosen one is not installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Protocol

__all__ = ["REPORT_TO", "missing_package", "Reporter"]

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
    """Sends step records to the ``report_to`` sink ("none": nowhere); the sink opens with the first record,
    so a run that stops before its first step leaves no event files.

    ``config`` (flat field names) is attached to the run as its hyperparameters.
    Raises ``ValueError`` (see :func:`missing_package`) when the sink's package is not installed.
    """

    def __init__(self, report_to: str, out_dir: str | Path, config: dict[str, Any]) -> None:
        if why := missing_package(report_to):
            raise ValueError(why)
        self.report_to, self.out_dir, self.config = report_to, Path(out_dir), config
        self._sink: _Sink | None = None

    def log(self, record: dict[str, Any]) -> None:
        """One step's record: its numeric values (``step`` itself excluded) at ``record["step"]``."""
        if self.report_to == "none":
            return
        if self._sink is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._sink = (_TensorBoard if self.report_to == "tensorboard" else _Wandb)(self.out_dir, self.config)
        scalars = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self._sink.log(scalars, int(record["step"]))

    def close(self) -> None:
        """Flush and close the sink (if one opened)."""
        if self._sink is not None:
            self._sink.close()
            self._sink = None
