"""Sharded training checkpoints (torch.distributed.checkpoint), the initial weights read shard by shard
from Hugging Face safetensors, and the final Hugging Face export gathered one tensor at a time.

Layout under ``<out_dir>/checkpoints``::

    step_00000012/          one complete checkpoint (DCP shards of model + optimizer,
        .metadata, *.distcp  rng_rank<r>.pt per rank, trainer_state.json from rank 0)
    .tmp_step_00000014/     a checkpoint being written; never read

A checkpoint is written into the ``.tmp_`` directory by every rank and renamed by rank 0 after
a barrier, so a run killed mid-save leaves the previous checkpoint as the latest complete one.
Works with or without an initialised process group (DCP's ``no_dist`` path on one process).

The trained model is exported to ``<out_dir>/final/`` (safetensors + config + tokenizer), apart
from the checkpoints and the metrics.
"""

from __future__ import annotations

import contextlib
import copy
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
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

__all__ = ["latest_checkpoint", "save_checkpoint", "load_checkpoint", "load_hf_weights", "EXPORT_DTYPES",
           "export_dtype", "export_hf"]

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


def _distinct_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict (this rank's shards, nothing gathered) without the later names of a parameter
    registered under several (tied input/output embeddings): the same names on every rank."""
    first: set[int] = set()
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases.add(name.replace(_CHECKPOINT_PREFIX, ""))
        first.add(id(param))
    return {name: value for name, value in get_model_state_dict(model).items() if name not in aliases}


def load_hf_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Fill ``model`` (a Hugging Face model, ``fully_shard``-ed or not, parameters allocated) with the
    weights of the safetensors in ``folder``; each rank reads only its own shards' slices.

    Collective. DCP's Hugging Face reader plans each rank's slices and copies them (cast to the
    parameters' dtype) into the local shards from the memory-mapped files. One tensor per DCP load:
    the reader keeps a file mapped while it serves a load, and every page it touched stays resident
    until then, so one load of everything would hold this rank's share of the files on top of its
    shards; per tensor, only that tensor's slice is. A tied tensor absent from the files
    (``lm_head.weight``) is filled through its tie; any other missing tensor raises ValueError
    naming the folder.
    """
    reader = HuggingFaceStorageReader(str(folder))
    stored = reader.read_metadata().state_dict_metadata
    distinct = _distinct_tensors(model)
    if missing := sorted(set(distinct) - set(stored)):
        raise ValueError(f"{folder}: the safetensors lack {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"({len(missing)} tensors of {type(model).__name__})")
    with _single_process_intended():
        for name, tensor in distinct.items():
            dcp.load({name: tensor}, storage_reader=reader, no_dist=not dist.is_initialized())
    logger.info("loaded %d tensors from %s into this rank's shards", len(distinct), folder)


EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype of the exported weights: ``setting`` one of :data:`EXPORT_DTYPES`, or "auto", the dtype the
    forward passes ran in: bf16 on CUDA (FSDP2 mixed precision, or autocast on one GPU), fp32 on the CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if setting not in EXPORT_DTYPES:
        raise ValueError(f"export_dtype: expected 'auto' or one of {sorted(EXPORT_DTYPES)}, got {setting!r}")
    return EXPORT_DTYPES[setting]


def export_hf(model: torch.nn.Module, tokenizer: Any, folder: str | Path, *, dtype: torch.dtype,
              max_file_bytes: int | str = "5GB") -> Path:
    """Save ``model`` (a Hugging Face ``PreTrainedModel``, sharded or not) and ``tokenizer`` as an HF folder
    ``folder`` with weights in ``dtype``: safetensors files of at most ``max_file_bytes`` (a larger tensor
    gets a file of its own; an index when several files), config.json, generation_config.json, the
    tokenizer. Returns ``folder``.

    Collective. Tensors are gathered to full size one at a time (each cast to ``dtype`` on its
    shards first); rank 0 keeps the gathered tensors of one file at most, writes it and drops
    them, so no rank ever holds the whole state dict. Tied tensors are written once, as
    ``save_pretrained`` does, so the folder reloads tied; GGUF quantisation markers are dropped.
    """
    folder = Path(folder)
    rank = _rank()
    state = _distinct_tensors(model)
    # The file plan needs only names, shapes and the export dtype: meta stand-ins, no memory.
    plan = split_torch_state_dict_into_shards(
        {name: torch.empty(value.shape, dtype=dtype, device="meta") for name, value in state.items()},
        max_shard_size=max_file_bytes)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    for filename, names in plan.filename_to_tensors.items():
        tensors = {}
        for name in names:
            value = state[name].detach().to(dtype)
            full = value.full_tensor() if isinstance(value, DTensor) else value
            if rank == 0:
                tensors[name] = full.to("cpu").contiguous()
            del full
        if rank == 0:
            save_file(tensors, folder / filename, metadata={"format": "pt"})
        del tensors
    if rank == 0:
        if plan.is_sharded:
            index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):  # a GGUF source's marker; the weights are plain now
            del config.quantization_config
        config.dtype = dtype
        config.architectures = [type(model).__name__]
        config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        logger.info("exported the Hugging Face model (%s, %d files) to %s", str(dtype).removeprefix("torch."),
                    len(plan.filename_to_tensors), folder)
    _barrier()
    return folder
