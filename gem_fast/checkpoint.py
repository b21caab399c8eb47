"""Sharded training checkpoints (torch.distributed.checkpoint) and the final Hugging Face export.

Layout under ``<out_dir>/checkpoints``::

    step_00000012/          one complete checkpoint (DCP shards of model + optimizer,
        .metadata, *.distcp  rng_rank<r>.pt per rank, trainer_state.json from rank 0)
    .tmp_step_00000014/     a checkpoint being written; never read

A checkpoint is written into the ``.tmp_`` directory by every rank and renamed by rank 0 after
a barrier, so a run killed mid-save leaves the previous checkpoint as the latest complete one.
Works with or without an initialised process group (DCP's ``no_dist`` path on one process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from gem_fast.models import prepare_for_save

__all__ = ["latest_checkpoint", "save_checkpoint", "load_checkpoint", "export_hf"]

logger = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_intended() -> Iterator[None]:
    """Mute DCP's warning that it assumes a single process: without a process group that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (``.tmp_`` dirs ignored), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def _rng_state() -> dict[str, Any]:
    # Only tensors and plain Python values, so that loading works with weights_only=True:
    # numpy's MT19937 key array travels as a tensor.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    *,
    keep_last: int = 2,
) -> Path:
    """Write model + optimizer shards, every rank's RNG state and ``trainer_state`` (JSON) atomically.

    Collective: every rank must call it. ``trainer_state`` (step, data position, scheduler state)
    is rank 0's; ``keep_last`` complete checkpoints are kept, older ones deleted. Returns the
    final directory.
    """
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed mid-save
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_intended():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        complete = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
        for old in complete[: max(0, len(complete) - keep_last)]:
            shutil.rmtree(old)
        logger.info("checkpoint saved: %s", final)
    _barrier()
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from ``path`` in place; returns the trainer state.

    Collective. The DCP shards are resharded to the current world size; the RNG file of this
    rank must exist (resume with the world size the checkpoint was written with).
    """
    path = Path(path)
    rng_file = path / f"rng_rank{_rank()}.pt"
    if not rng_file.is_file():
        raise ValueError(f"{path}: no RNG state for rank {_rank()}; resume with the same world size")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_intended():
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    # The RNG pickle holds python/numpy tuples, not only tensors.
    _set_rng_state(torch.load(rng_file, weights_only=True))
    logger.info("resumed from %s", path)
    return json.loads((path / "trainer_state.json").read_text())


def export_hf(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path) -> None:
    """Save ``model`` (an HF ``PreTrainedModel``, sharded or not) and ``tokenizer`` as an HF folder.

    Collective: all ranks gather the full state dict (on CPU); rank 0 writes safetensors.
    GGUF quantisation markers are dropped first (:func:`gem_fast.models.prepare_for_save`).
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Gathering unshares tied weights (embedding = LM head); keep each Parameter under its first
    # name only, as save_pretrained does for a plain tied model, so the folder reloads tied.
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            full.pop(name, None)
        seen.add(id(param))
    if _rank() == 0:
        prepare_for_save(model)
        model.save_pretrained(out_dir, state_dict=full, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        logger.info("exported Hugging Face model to %s", out_dir)
    _barrier()
