"""TRL's fused LM head answered by gem_fast's kernels.

TRL 1.16's trainers (GRPO, RLOO, DPO, KTO, SFT) add their own fused head to the policy and the
reference model (``trl.trainer.utils.add_fused_lm_head``) and read per-token statistics through
``model(..., labels=labels, fused_lm_head=True)``. A model patched by
:func:`gem_fast.integrations.patch_causal_lm` after that answers those calls here, with the
settings TRL gave its head (temperature, ``cast_lm_head_to_fp32``, the fields it computes):

    trainer = GRPOTrainer(...)          # or RLOO, DPO, KTO, SFT; with or without peft_config
    patch_trainer(trainer)              # the policy and the reference model
    trainer.train()
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from transformers.utils import ModelOutput

__all__ = ["TrlFusedOutput", "TrlHead", "patch_trainer", "trl_fused_forward", "trl_head"]

# The per-token fields of TRL 1.16's FusedCausalLMOutput; all but the first two are row statistics.
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass
class TrlFusedOutput(ModelOutput):
    """What a patched model returns for TRL's ``fused_lm_head=True`` calls: the fields of TRL's own
    ``FusedCausalLMOutput`` that its head was asked for (the others None). Per-token fields are
    [B, L-1] ([B, L] with ``shift_labels``), 0 (False) where the label is -100; ``loss`` is the
    negative log-likelihood summed over the labelled tokens / their count (or ``num_items_in_batch``)."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None  # float32 nats
    entropy: torch.Tensor | None = None  # float32 nats
    log_sum_sq_probs: torch.Tensor | None = None  # float32, log Σ_v p_v², no gradient (DPO's use_weighting)
    mean_logits: torch.Tensor | None = None  # float32, mean over the vocabulary of z / T, no gradient
    is_top1: torch.Tensor | None = None  # bool, the label is the (first) most likely token
    label_mask: torch.Tensor | None = None  # bool, the label is not -100


class TrlHead(NamedTuple):
    """The settings of TRL's ``add_fused_lm_head`` that decide its numbers."""

    temperature: float
    cast_lm_head_to_fp32: bool
    outputs: tuple[str, ...]


def _trl_fused_function(forward: Callable) -> Callable | None:
    """TRL's ``_fused_forward`` behind ``forward``: itself, or under wrappers that name what they wrap
    (``__wrapped__``: accelerate's autocast of a prepared reference model)."""
    function, seen = getattr(forward, "__func__", forward), set()
    while function is not None and id(function) not in seen:
        seen.add(id(function))
        code = getattr(function, "__code__", None)
        if code is not None and code.co_name == "_fused_forward" and code.co_filename.endswith(
                os.path.join("trl", "trainer", "utils.py")):
            return function
        function = getattr(function, "__wrapped__", None)
        function = getattr(function, "__func__", function)
    return None


def trl_head(forward: Callable) -> TrlHead | None:
    """The settings of the TRL fused head that installed ``forward`` (a model's ``forward``), or None
    when ``forward`` is not TRL's head. Read from the closure of TRL's ``_fused_forward``; a TRL whose
    head keeps them elsewhere, or one that computes something gem_fast does not, is refused by name."""
    function = _trl_fused_function(forward)
    if function is None:
        return None
    settings = inspect.getclosurevars(function).nonlocals
    missing = sorted({"temperature", "cast_lm_head_to_fp32", "outputs", "text_config"} - settings.keys())
    if missing:
        raise ValueError(f"model: this TRL's fused head ({function.__code__.co_filename}) keeps no {', '.join(missing)} "
                         "where gem_fast.trl_support reads them (TRL 1.16's add_fused_lm_head)")
    unknown = sorted(set(settings["outputs"]) - set(FIELDS))
    if unknown:
        raise ValueError(f"model: TRL's fused head asks for {', '.join(unknown)}, which gem_fast does not compute "
                         f"(it gives {', '.join(FIELDS)})")
    if getattr(settings["text_config"], "output_router_logits", False):
        raise ValueError(f"model: {settings['text_config'].model_type} asks for router logits "
                         "(output_router_logits): TRL's MoE aux_loss is not computed by gem_fast.trl_support")
    return TrlHead(float(settings["temperature"]), bool(settings["cast_lm_head_to_fp32"]),
                   tuple(settings["outputs"]))


def trl_fused_forward(replaced_forward: Callable, fused_head: Callable, args: tuple, kwargs: dict,
                      labels: torch.Tensor | None, shift_labels: torch.Tensor | None, num_items_in_batch: Any,
                      temperature: float) -> TrlFusedOutput:
    """Answer ``model(*args, labels=..., fused_lm_head=True, **kwargs)``. ``labels`` [B, L] are
    aligned with ``input_ids`` (the label at t+1 is scored from position t), or ``shift_labels``
    [B, L] are pre-shifted. ``fused_head(args, kwargs, targets, temperature, **kernel_options)``
    runs the backbone and :func:`gem_fast.kernels.fused_logprob_entropy` and returns ``(backbone
    outputs, *kernel results)``. ``replaced_forward`` is the forward the patch replaced: where it is
    TRL's head its settings apply, else ``temperature`` with log-probs and entropy."""
    head = trl_head(replaced_forward) or TrlHead(temperature, False, ("log_probs", "entropy"))
    targets = shift_labels if shift_labels is not None else torch.nn.functional.pad(labels[:, 1:], (0, 1),
                                                                                    value=-100)
    row_stats = bool(set(FIELDS[2:]) & set(head.outputs))
    options = {"return_row_stats": row_stats, "gemm_dtype": torch.float32 if head.cast_lm_head_to_fp32 else None}
    _, *results = fused_head(args, {**kwargs, "use_cache": False}, targets, head.temperature, **options)
    if shift_labels is None:
        targets, results = targets[:, :-1], [t[:, :-1] for t in results]
    mask = targets != -100
    logprobs, entropy = results[:2]
    fields = {"log_probs": logprobs, "entropy": entropy}
    if row_stats:
        _, _, _, argmax, mean_logit, log_sum_sq_prob = results
        fields.update(log_sum_sq_probs=log_sum_sq_prob, mean_logits=mean_logit, is_top1=(argmax == targets) & mask)
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return TrlFusedOutput(loss=-logprobs.sum() / count, label_mask=mask,
                          **{name: fields[name] for name in head.outputs})


def _unwrapped(trainer: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside a trainer's model: without accelerate's wrappers, and for a PEFT model
    its base model (LoRA's layers live inside it, and TRL put its head there)."""
    model = trainer.accelerator.unwrap_model(model)
    get_base_model = getattr(model, "get_base_model", None)
    # An adapter on lm_head itself TRL refuses when it builds the trainer.
    return get_base_model() if callable(get_base_model) and hasattr(model, "peft_config") else model


def patch_trainer(trainer: Any, **patch_options: Any) -> Any:
    """Patch a built TRL trainer's policy (``trainer.model``, its base model under PEFT) and
    reference model (``trainer.ref_model``, where there is one) with
    :func:`gem_fast.integrations.patch_causal_lm`, so every ``fused_lm_head=True`` call of the
    trainer runs gem_fast's kernels with the settings TRL gave its head. ``patch_options``
    (``backend``, ``block_bytes``, ...) go to ``patch_causal_lm``. A model without TRL's fused head
    is refused by name: such a trainer makes no fused call for gem_fast to answer. Returns the trainer."""
    from gem_fast import integrations  # here: integrations imports this module

    for name in ("model", "ref_model"):
        model = getattr(trainer, name, None)
        if model is None:
            continue
        model = _unwrapped(trainer, model)
        forward = getattr(model.forward, "__func__", model.forward)
        if getattr(getattr(forward, "__code__", None), "co_filename", None) == integrations.__file__:
            continue  # patched already
        if trl_head(forward) is None:
            raise ValueError(f"trainer.{name}: {type(model).__name__} has no TRL fused head (add_fused_lm_head); "
                             "patch_trainer needs a trainer that calls fused_lm_head=True (TRL >= 1.16)")
        integrations.patch_causal_lm(model, **patch_options)
    return trainer
