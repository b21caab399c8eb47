"""The fused kernels inside other RLHF code: a Hugging Face causal LM that returns per-token
log-probs and entropy instead of logits.

    from gem_fast.integrations import patch_causal_lm
    patch_causal_lm(model)                       # before or after FSDP2 fully_shard
    out = model(input_ids=ids, attention_mask=mask, logprob_targets=targets, temperature=0.7)
    out.logprobs, out.entropy                    # [B, L] float32, 0 where targets == -100

``targets[:, t]`` is the token whose log-prob the hidden state at position t gives (the next
token: ``targets = ids[:, 1:]`` padded with -100 at the end, response positions only). The
computation runs inside the model's own ``forward``, so under FSDP2 the LM head (tied to the
embeddings or not) is the gathered tensor, and the output is a ``ModelOutput`` whose tensors
FSDP2's backward hooks find. Logit soft-capping (Gemma-2/3 ``final_logit_softcapping``) and
scale (Cohere ``logit_scale``) are read from the model's config. Calls without
``logprob_targets`` run the original forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from transformers.utils import ModelOutput

from gem_fast.kernels import fused_logprob_entropy
from gem_fast.trl_support import TrlFusedOutput, trl_fused_forward

__all__ = ["SUPPORTED_MODEL_TYPES", "FusedLogprobOutput", "TrlFusedOutput", "OutputHead", "output_head", "patch_causal_lm",
           "unpatch_causal_lm"]

logger = logging.getLogger(__name__)

# Families whose causal-LM head is ``lm_head(base_model(...).last_hidden_state)``, then the
# scale/soft-cap that output_head reads from the config.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text", "cohere")
_ORIGINAL = "_gem_fast_original_forward"


@dataclass
class FusedLogprobOutput(ModelOutput):
    """What a patched model returns for a call with ``logprob_targets``."""

    logprobs: torch.Tensor | None = None  # [..., L] float32 nats; 0 where the target is ignored
    entropy: torch.Tensor | None = None  # [..., L] float32 nats, softmax(z / T)
    past_key_values: Any = None


class OutputHead(NamedTuple):
    """The LM head as the kernels take it: logits z = softcap·tanh(scale·(W h + b) / softcap)."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    logit_scale: float
    logit_softcap: float | None


def output_head(model: torch.nn.Module) -> OutputHead:
    """The head of a Hugging Face causal LM with the logit scale and soft-cap of its config."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model: {type(model).__name__} has no output embeddings (get_output_embeddings())")
    config = model.config
    scale = getattr(config, "logit_scale", None)
    return OutputHead(head.weight, getattr(head, "bias", None), 1.0 if scale is None else float(scale),
                      getattr(config, "final_logit_softcapping", None))


def _check_layout(model: torch.nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in SUPPORTED_MODEL_TYPES:
        return
    has_layout = getattr(model, "base_model", None) is not model and callable(getattr(model, "get_output_embeddings", None))
    if not has_layout or model.get_output_embeddings() is None:
        raise ValueError(f"model: type {model_type!r} ({type(model).__name__}) is not a causal LM with a base model "
                         f"and output embeddings; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    logger.warning("gem_fast.integrations: model type %r is not among %s; patching it as lm_head(base_model(...)) "
                   "with the config's logit_scale/final_logit_softcapping, which is right only if its forward "
                   "does nothing else to the logits", model_type, SUPPORTED_MODEL_TYPES)


def patch_causal_lm(model: torch.nn.Module, *, backend: str = "auto", temperature: float = 1.0,
                    **kernel_options: Any) -> torch.nn.Module:
    """Give ``model.forward`` the keywords ``logprob_targets`` ([..., L] int64, -100 = ignored) and
    ``temperature`` (default: this call's); with them it returns :class:`FusedLogprobOutput` (no
    logits). TRL's convention works too: ``model(..., labels=labels, fused_lm_head=True)``
    (``labels`` aligned with ``input_ids``, or pre-shifted ``shift_labels``) returns
    :class:`TrlFusedOutput` with the settings of the TRL head it replaced (temperature, fields,
    fp32 head; :mod:`gem_fast.trl_support`), so patching a model after TRL's trainer has added its
    own fused head makes TRL read gem_fast's numbers. ``backend`` and
    ``kernel_options`` (``block_bytes``, ``dw_accumulation``, ``drop_ignored_rows``) go to
    :func:`gem_fast.kernels.fused_logprob_entropy`. Returns the model, patched in place; patching
    twice is a no-op; :func:`unpatch_causal_lm` undoes it."""
    _check_layout(model)
    if _ORIGINAL in vars(model):
        return model
    original = model.forward
    default_temperature = temperature

    def logprobs_and_entropy(args: tuple, kwargs: dict, targets: torch.Tensor, temperature: float, **options: Any):
        # ``options``: extra kernel keywords of a caller (TRL's fused head: row statistics, fp32 head).
        outputs = model.base_model(*args, **kwargs)
        head = output_head(model)
        results = fused_logprob_entropy(
            outputs.last_hidden_state, head.weight, targets, bias=head.bias, temperature=temperature,
            logit_scale=head.logit_scale, logit_softcap=head.logit_softcap, backend=backend, **kernel_options,
            **options)
        return outputs, *results

    def forward(*args: Any, logprob_targets: torch.Tensor | None = None, temperature: float = default_temperature,
                fused_lm_head: bool = False, labels: torch.Tensor | None = None,
                shift_labels: torch.Tensor | None = None, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if fused_lm_head:
            return trl_fused_forward(original, logprobs_and_entropy, args, kwargs, labels, shift_labels, num_items_in_batch, temperature)
        if logprob_targets is None:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        outputs, logprobs, entropy = logprobs_and_entropy(args, kwargs, logprob_targets, temperature)
        return FusedLogprobOutput(logprobs=logprobs, entropy=entropy,
                                  past_key_values=getattr(outputs, "past_key_values", None))

    setattr(model, _ORIGINAL, original)
    model.forward = forward
    return model


def unpatch_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the forward :func:`patch_causal_lm` replaced (a no-op on an unpatched model)."""
    if _ORIGINAL in vars(model):
        del model.forward
        delattr(model, _ORIGINAL)
    return model
