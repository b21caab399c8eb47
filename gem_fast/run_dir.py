"""A training run's out_dir: its lock, the refusal to overwrite a finished run, the resume check; and a
run's folder named as a model (its ``final/``).

Layout the checks look at::

    <out_dir>/run.lock          {"pid", "host", "started"} of the run using the folder (rank 0's process)
    <out_dir>/checkpoints/      see gem_fast.checkpoint
    <out_dir>/metrics.jsonl     one JSON record per optimizer step (gem_fast.reporting)
    <out_dir>/model.safetensors, <out_dir>/final/   the exported model (either layout)

Everything here runs on rank 0 (or every rank, read-only) before the model loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from gem_fast.config import TrainConfig
from gem_fast.errors import UsageError, check_model_source, output_dir, training_data

__all__ = ["LOCK_NAME", "run_lock", "claim_out_dir", "checked_paths", "model_source", "trained_chat_template",
           "file_sha256", "settings_changes"]

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# What a finished (or started) run leaves: a second fresh run would mix its files with these.
_RUN_OUTPUTS = ("model.safetensors", "model.safetensors.index.json", "final", "metrics.jsonl", "checkpoints")
# What --overwrite deletes before a fresh run: files it would append to or interleave with.
_CLEARED_BY_OVERWRITE = ("checkpoints", "metrics.jsonl", "final")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):  # removed meanwhile, or a write torn by a crash
        return None
    return holder if isinstance(holder, dict) else None


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[Path]:
    """Hold ``out_dir/run.lock`` (created atomically) while the block runs; removed on exit.

    A lock of a live process (or of another host) stops with :class:`UsageError` naming its pid,
    host and start time; a lock whose pid is dead on this host (a crashed or killed run) is taken over.
    """
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is not None and (holder.get("host") != me["host"] or _pid_alive(int(holder.get("pid", -1)))):
                raise UsageError(
                    f"--out_dir {out_dir}: in use by pid {holder.get('pid')} on {holder.get('host')} since "
                    f"{holder.get('started')} ({path}); wait for that run, choose another --out_dir, or delete "
                    "the lock if that run is gone") from None
            logger.warning("taking over the stale lock %s of a run that is gone: %s", path, holder)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    else:
        raise UsageError(f"--out_dir {out_dir}: another run took {path} while this one cleared a stale lock; retry")
    try:
        yield path
    finally:
        if (_read_lock(path) or {}).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
        if created and not any(out_dir.iterdir()):  # a run that stopped before writing anything leaves no trace
            out_dir.rmdir()


def claim_out_dir(out_dir: Path, *, resume: bool, overwrite: bool, has_checkpoint: bool) -> None:
    """Refuse (:class:`UsageError`) an ``out_dir`` that holds a run unless ``resume`` or ``overwrite``;
    with ``overwrite`` delete its checkpoints, metrics and ``final/`` first (logged). ``resume`` of a
    finished run (``final/`` written), or of a run with no checkpoint (``has_checkpoint`` false: it
    would restart at step 0 over its own outputs), is refused too; ``resume`` of an empty out_dir starts it."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite: choose one (continue the run in out_dir, or replace it)")
    found = [name for name in _RUN_OUTPUTS if (out_dir / name).exists()]
    if not found:
        return
    if resume:
        if (out_dir / "final").exists():
            raise UsageError(f"--resume: the run in {out_dir} is finished ({out_dir / 'final'} written); pass "
                             "--overwrite to train it again from step 0, or choose another --out_dir")
        if not has_checkpoint:
            raise UsageError(f"--resume: {out_dir} holds a run ({', '.join(found)}) but no checkpoint to resume "
                             "from (--save_every 0 writes one only when a signal stops the run); pass --overwrite "
                             "to start it again from step 0")
        return
    if not overwrite:
        raise UsageError(f"--out_dir {out_dir}: holds a run ({', '.join(found)}); pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --out_dir")
    for name in _CLEARED_BY_OVERWRITE:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    logger.warning("--overwrite: deleted %s of the earlier run in %s", ", ".join(_CLEARED_BY_OVERWRITE), out_dir)


# What says a folder is a model, and what says it is an out_dir of train_*.py.
_MODEL_MARKER = "config.json"
_RUN_MARKERS = ("train_config.json", "metrics.jsonl", "checkpoints", LOCK_NAME)


def model_source(name_or_path: str | None, flag: str = "--model_name_or_path") -> str | None:
    """The model ``name_or_path`` names, checked before anything loads: a training run's out_dir means
    its ``final/`` (logged), as GEM's README chains ``--out_dir outputs/sft-demo`` into
    ``--model_name_or_path outputs/sft-demo``. A run without ``final/`` yet, or a folder that is neither
    a model nor a run, is a :class:`UsageError` naming what it holds; the rest as
    :func:`~gem_fast.errors.check_model_source` (None: the embedded model; a .gguf file; a Hub id)."""
    check_model_source(name_or_path, flag)
    if name_or_path is None or not Path(name_or_path).expanduser().is_dir():
        return name_or_path
    folder = Path(name_or_path).expanduser()
    if (folder / _MODEL_MARKER).is_file():
        return name_or_path
    if (folder / "final" / _MODEL_MARKER).is_file():
        logger.info("%s %s: a training run; using its trained model %s", flag, name_or_path, folder / "final")
        return str(folder / "final")
    held = sorted(p.name + "/" * p.is_dir() for p in folder.iterdir())
    listing = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "") if held else "nothing"
    if any((folder / name).exists() for name in _RUN_MARKERS):
        raise UsageError(f"{flag} {name_or_path}: a training run without final/ yet (it holds {listing}); "
                         f"finish it (--resume --out_dir {name_or_path}), or name a model folder")
    raise UsageError(f"{flag} {name_or_path}: neither a model folder (no {_MODEL_MARKER}) nor a training run "
                     f"(no final/); it holds {listing}")


def trained_chat_template(model: str | None) -> bool | None:
    """The ``chat_template`` setting the run that wrote ``model`` (its ``<out_dir>/final``) trained with,
    from its ``train_config.json``; None for any other model."""
    if model is None or Path(model).name != "final":
        return None
    config = Path(model).parent / "train_config.json"
    try:
        return bool(json.loads(config.read_text())["chat_template"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checked_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its model resolved (:func:`model_source`) once out_dir, the training data and the
    model are checked: :class:`UsageError` naming the flag and path before anything loads or is made.
    Imports no torch: the scripts run it right after parsing."""
    output_dir(cfg.run.out_dir, "--out_dir")
    training_data(cfg.run.train_jsonl, "--train_jsonl")
    return cfg.replace(model_name_or_path=model_source(cfg.run.model_name_or_path))


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read 1 MiB at a time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def settings_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, new value)}`` for every key of either dict whose values differ."""
    return {k: (saved.get(k), now.get(k)) for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)}
