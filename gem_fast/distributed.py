"""Distributed execution: the process group, collectives the engine uses, clipping, FSDP2 wrapping.

Without ``RANK`` in the environment no process group is created and nothing is sharded (CPU, or
one GPU). Under torchrun / ``accelerate launch``: NCCL on CUDA, gloo on the CPU; each decoder
layer and the root are ``fully_shard``-ed (torchtitan's order: activation checkpointing, then
``torch.compile`` per layer, then FSDP2). Every helper here is a no-op on one unsharded process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

__all__ = ["DistEnv", "process_group", "exit_with_launcher", "all_reduce_sum", "broadcast_flag", "all_gather_strided",
           "clip_grad_norm", "parallelize", "fsdp_gathered", "free_port"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run: rank of ``world`` ranks, its device, and whether a process
    group exists and the model is ``fully_shard``-ed."""

    rank: int
    world: int
    device: torch.device
    sharded: bool

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> DistEnv:
        """One unsharded process on ``device``."""
        return cls(0, 1, torch.device(device), sharded=False)


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now, for a local rendezvous (``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_launcher() -> bool:
    """Ask Linux to send this process SIGTERM when its parent (the torchrun launcher) dies, so that a
    killed launcher does not leave its workers training; the loop handles that SIGTERM as any other
    (checkpoint, exit 143). Returns whether it is set: Linux only (elsewhere it is logged and skipped)."""
    if not sys.platform.startswith("linux"):
        logger.info("workers do not follow a dying launcher on %s (PR_SET_PDEATHSIG is Linux-only)", sys.platform)
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): workers outlive a killed launcher",
                       ctypes.get_errno())
        return False
    return True


@contextlib.contextmanager
def process_group() -> Iterator[DistEnv]:
    """This process's :class:`DistEnv`, from torchrun's environment when ``RANK`` is set; a process
    group this call creates is destroyed on exit (one that already existed is left as it was).
    A worker started by a launcher also exits with it (:func:`exit_with_launcher`)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ and not dist.is_initialized():
        yield DistEnv.single("cuda" if cuda else "cpu")
        return
    if "RANK" in os.environ:
        exit_with_launcher()
    created = not dist.is_initialized()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if created:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    try:
        yield DistEnv(dist.get_rank(), dist.get_world_size(), device, sharded=True)
    finally:
        if created:
            dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """``x`` summed over ranks, in place; returned for chaining."""
    if env.sharded:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_flag(flag: bool, env: DistEnv) -> bool:
    """Rank 0's ``flag`` on every rank (so all ranks take the same branch and run the same collectives)."""
    if not env.sharded:
        return flag
    value = torch.tensor(float(flag), device=env.device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def all_gather_strided(local: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Rank r's ``local`` [n] holds items r, r + world, ...; returns all n·world items in order."""
    if not env.sharded:
        return local
    parts = [torch.empty_like(local) for _ in range(env.world)]
    dist.all_gather(parts, local)
    return torch.stack(parts, dim=1).reshape(-1)  # [n, world]: row j, column r is item j·world + r


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (0-dim, over all ranks' shards); scales them to ``max_norm`` if > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):  # sharded grads give a partial norm; reduce it over ranks
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no base_model.layers ModuleList to shard/checkpoint per layer")
    return layers


def parallelize(policy: nn.Module, *, activation_checkpointing: bool, sharded: bool, device: torch.device,
                compile_layers: bool = False) -> nn.Module:
    """Per-layer activation checkpointing, then torch.compile per layer, then FSDP2 on every decoder
    layer and the root (if ``sharded``): torchtitan's order.

    ``policy`` is the root wrapper (:class:`gem_fast.policy.PolicyLoss`): its ``model`` holds the
    decoder layers, and its ``fsdp_forward_methods`` are registered so they gather like ``forward``.
    Embeddings, final norm and LM head stay in the root unit, so tied input/output embeddings
    remain one parameter. Parameters on the meta device (:func:`gem_fast.models.empty_model`) are
    allocated on ``device`` after sharding, uninitialised (each rank its shards only), for
    :func:`gem_fast.checkpoint.load_hf_weights` to fill; buffers keep their values. Returns ``policy``
    (modified in place).
    """
    layers = _decoder_layers(policy.model)
    buffers = _real_buffers(policy) if any(p.is_meta for p in policy.parameters()) else None
    if activation_checkpointing:
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    if compile_layers:
        # In place (nn.Module.compile), not a torch.compile wrapper module: parameter names, hence
        # checkpoints and the HF export, stay the eager model's. Layers share code, so one graph serves all.
        for layer in layers:
            layer.compile()
        logger.info("torch.compile (inductor) on each of %d decoder layers; the first step compiles", len(layers))
    if not sharded:
        return policy.to(device) if buffers is None else _allocate(policy, buffers, device)
    on_cuda = device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if on_cuda else None, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    # The root's inputs include float32 loss weights: casting them to bf16 would round them.
    fully_shard(policy, mp_policy=MixedPrecisionPolicy(mp.param_dtype, mp.reduce_dtype, cast_forward_inputs=False))
    for method in getattr(policy, "fsdp_forward_methods", ()):
        register_fsdp_forward_method(policy, method)
    return policy if buffers is None else _allocate(policy, buffers, device)


_Buffers = list[tuple[nn.Module, str, torch.Tensor]]


def _real_buffers(module: nn.Module) -> _Buffers:
    """Copies of every buffer of ``module`` (owner, name, value), which must not be on the meta device."""
    saved = []
    for owner_name, owner in module.named_modules():
        for name, buffer in owner.named_buffers(recurse=False):
            if buffer.is_meta:
                raise ValueError(f"buffer {owner_name}.{name} is on the meta device: build the model with its "
                                 "buffers computed (gem_fast.models.empty_model)")
            saved.append((owner, name, buffer.clone()))
    return saved


def _allocate(policy: nn.Module, buffers: _Buffers, device: torch.device) -> nn.Module:
    """Meta parameters (sharded or not) allocated on ``device``, uninitialised, ties kept; ``buffers``' values
    put back."""
    # Unsharded, to_empty gives each registration of a tied parameter its own tensor: re-tie them after.
    registrations = [(owner, name, param) for owner in policy.modules()
                     for name, param in owner.named_parameters(recurse=False)]
    policy.to_empty(device=device)  # the FSDP root's re-registers each rank's shards; it empties buffers too
    allocated: dict[int, nn.Parameter] = {}
    for owner, name, meta_param in registrations:
        param = allocated.setdefault(id(meta_param), getattr(owner, name))
        if getattr(owner, name) is not param:
            setattr(owner, name, param)
    with torch.no_grad():
        for owner, name, value in buffers:
            getattr(owner, name).copy_(value)
    return policy


@contextlib.contextmanager
def fsdp_gathered(model: nn.Module) -> Iterator[None]:
    """All-gather FSDP2 parameters once and keep them gathered for every forward inside the block
    (the sampler's many decode steps); no-op for a model without FSDP2 modules."""
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp_modules:
        yield
        return
    # FSDP2 has no public getter for reshard_after_forward; save its per-group setting to restore it.
    saved = []
    for module in fsdp_modules:
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch < 2.7: at most one group per module
            groups = [g for g in [state._fsdp_param_group] if g is not None]
        auto = getattr(state, "_auto_reshard_after_forward", None)
        saved.append((state, auto, [(g, g.post_forward_mesh_info) for g in groups]))
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    logger.info("FSDP2 parameters of %d modules gathered for the sampling phase", len(fsdp_modules))
    try:
        yield
    finally:
        for module, (state, auto, groups) in zip(fsdp_modules, saved):
            for group, mesh_info in groups:
                group.post_forward_mesh_info = mesh_info
            if auto is not None:
                state._auto_reshard_after_forward = auto
            module.reshard()
