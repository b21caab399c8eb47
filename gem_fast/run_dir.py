"""A training run's out_dir: its lock, the refusal to overwrite a finished run, the resume check, metrics.jsonl.

Layout the checks look at::

    <out_dir>/run.lock          {"pid", "host", "started"} of the run using the folder (rank 0's process)
    <out_dir>/checkpoints/      see gem_fast.checkpoint
    <out_dir>/metrics.jsonl     one JSON record per optimizer step
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
from typing import Any, Iterator, TextIO

from gem_fast.errors import UsageError

__all__ = ["LOCK_NAME", "run_lock", "claim_out_dir", "file_sha256", "settings_changes", "open_metrics"]

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


def claim_out_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse (:class:`UsageError`) an ``out_dir`` that holds a run unless ``resume`` or ``overwrite``;
    with ``overwrite`` delete its checkpoints, metrics and ``final/`` first (logged)."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite: choose one (continue the run in out_dir, or replace it)")
    found = [name for name in _RUN_OUTPUTS if (out_dir / name).exists()]
    if not found or resume:
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


def open_metrics(path: Path, start: int) -> TextIO:
    """Append handle on the metrics JSONL, minus records past ``start`` (steps a hard kill lost).

    A torn last line (a kill mid-write) is dropped with a warning; an unreadable line elsewhere
    stops with :class:`UsageError` naming it.
    """
    if path.exists():
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):
                    raise UsageError(f"{path}:{number}: not a JSON record; repair or delete the line") from None
                logger.warning("%s:%d: dropped a torn last line (a run killed mid-write): %r", path, number, line)
                continue
            if record["step"] <= start:
                kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")
