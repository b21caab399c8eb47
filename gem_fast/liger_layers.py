"""Liger-Kernel's RMSNorm, RoPE and SwiGLU layers in a loaded Llama-family model: whether to use them
(:func:`use_liger_layers`), patching them in (:func:`apply_liger_layers`) and what runs Liger code now
(:func:`liger_layer_names`). liger-kernel is optional: imported only when a patch is applied."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
from typing import Callable, Literal

import torch
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = ["LIGER_PACKAGE", "LIGER_MODEL_TYPES", "use_liger_layers", "liger_layer_names", "apply_liger_layers"]

LIGER_PACKAGE = "liger_kernel"
_ROPE_FUNCTION = "apply_rotary_pos_emb"
# Model types with the Llama decoder layout (input/post-attention RMSNorm, one gated MLP per layer)
# that apply_liger_layers checks; Liger patches others (MoE experts, other norm placements) differently.
LIGER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def use_liger_layers(setting: Literal["auto", "on", "off"], device: str | torch.device, model_type: str) -> bool:
    """Whether Liger's RMSNorm/RoPE/SwiGLU kernels replace the layers of a ``model_type`` model on ``device``.

    "auto": on when ``device`` is CUDA, liger-kernel is installed and it can patch ``model_type``;
    "on" raises ValueError naming what is missing. Liger's RMSNorm and SwiGLU kernels need CUDA
    tensors: the Triton interpreter cannot run them (it passes float scalars as Python floats).
    The choice and its reason are logged.
    """
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"liger_layers: expected 'auto', 'on' or 'off', got {setting!r}")
    missing = "turned off" if setting == "off" else _liger_missing(torch.device(device), model_type)
    if missing and setting == "on":
        raise ValueError(f"liger_layers='on': {missing}; use 'auto' or 'off'")
    logger.info("Liger layers %s (liger_layers=%r%s)", "off" if missing else "on", setting,
                f": {missing}" if missing else "")
    return missing is None


def _liger_missing(device: torch.device, model_type: str) -> str | None:
    """Why Liger layers cannot run for ``model_type`` on ``device`` (None: they can)."""
    if device.type != "cuda":
        return f"its Triton kernels need CUDA, the device is {device.type}"
    if importlib.util.find_spec(LIGER_PACKAGE) is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if model_type not in LIGER_MODEL_TYPES:
        return f"model type {model_type!r} is not one of the Llama-layout types {LIGER_MODEL_TYPES}"
    try:
        _liger_apply_function(model_type)
    except ValueError as exc:
        return str(exc)
    return None


def liger_layer_names(model: PreTrainedModel) -> list[str]:
    """What runs Liger code in ``model`` now: module names (RMSNorm, SwiGLU MLP), then the RoPE function.

    RoPE is a function of the model's modeling module, not a module: it is listed as
    ``<module>.apply_rotary_pos_emb`` when that module-wide function is Liger's.
    """
    names = [name for name, module in model.named_modules() if module._get_name().startswith("Liger")]
    modeling = sys.modules[type(model).__module__]
    rope = getattr(modeling, _ROPE_FUNCTION, None)
    if rope is not None and getattr(rope, "__module__", "").startswith(LIGER_PACKAGE):
        names.append(f"{modeling.__name__}.{_ROPE_FUNCTION}")
    return names


def _liger_apply_function(model_type: str) -> Callable[..., None]:
    """Liger's ``apply_liger_kernel_to_<type>`` for ``model_type``, if it patches RMSNorm, RoPE and SwiGLU."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    wanted = {"rope", "rms_norm", "swiglu", "cross_entropy", "fused_linear_cross_entropy", "model"}
    if apply_fn is None or not wanted <= inspect.signature(apply_fn).parameters.keys():
        raise ValueError(f"model type {model_type!r}: Liger-Kernel has no RMSNorm/RoPE/SwiGLU patch for it")
    return apply_fn


def _expected_liger_modules(model: PreTrainedModel, *, rms_norm: bool, swiglu: bool) -> list[str]:
    """The Llama-family modules a patch must reach: per decoder layer its two norms and MLP, and the final norm."""
    prefix = model.base_model_prefix
    layers = range(len(model.base_model.layers))
    norms = [f"{prefix}.layers.{i}.{n}" for i in layers for n in ("input_layernorm", "post_attention_layernorm")]
    return ([*norms, f"{prefix}.norm"] if rms_norm else []) + ([f"{prefix}.layers.{i}.mlp" for i in layers]
                                                               if swiglu else [])


def apply_liger_layers(
    model: PreTrainedModel, *, rope: bool = True, rms_norm: bool = True, swiglu: bool = True
) -> list[str]:
    """Patch a loaded Llama-family ``model`` in place with Liger's RMSNorm, RoPE and SwiGLU; returns
    :func:`liger_layer_names` (what now runs Liger code).

    Liger's cross-entropy stays off (gem_fast's kernels compute the loss from the hidden states).
    The norms and MLPs of this instance get Liger's ``forward``; RoPE is patched module-wide (every
    model of this type in the process, Liger's only way), while the layer classes Liger would also
    swap for models built later are put back. Raises ValueError for a model type Liger cannot patch,
    and RuntimeError when a norm or MLP was left unpatched. Needs CUDA to run (see :func:`use_liger_layers`).
    """
    model_type = model.config.model_type
    if importlib.util.find_spec(LIGER_PACKAGE) is None:
        raise ValueError("apply_liger_layers: liger-kernel is not installed (pip install liger-kernel)")
    if model_type not in LIGER_MODEL_TYPES:
        raise ValueError(f"apply_liger_layers: model type {model_type!r} is not one of {LIGER_MODEL_TYPES}")
    apply_fn = _liger_apply_function(model_type)
    modeling = sys.modules[type(model).__module__]
    before = dict(vars(modeling))
    apply_fn(rope=rope, rms_norm=rms_norm, swiglu=swiglu, cross_entropy=False, fused_linear_cross_entropy=False,
             model=model)
    for name, value in before.items():
        if name != _ROPE_FUNCTION and getattr(modeling, name) is not value:
            setattr(modeling, name, value)
    names = liger_layer_names(model)
    problem = None
    if missing := sorted(set(_expected_liger_modules(model, rms_norm=rms_norm, swiglu=swiglu)) - set(names)):
        problem = f"Liger left {missing} unpatched"
    elif rope and f"{modeling.__name__}.{_ROPE_FUNCTION}" not in names:
        problem = f"{modeling.__name__}.{_ROPE_FUNCTION} is not Liger's RoPE"
    if problem:
        # Leave no module-wide half patch behind for the models built after this error.
        setattr(modeling, _ROPE_FUNCTION, before[_ROPE_FUNCTION])
        raise RuntimeError(f"apply_liger_layers: {problem}")
    kinds = [module._get_name() for module in model.modules() if module._get_name().startswith("Liger")]
    logger.info("Liger layers applied to %s: %s; RoPE %s", type(model).__name__,
                ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds))),
                "patched module-wide" if rope else "unchanged")
    return names
