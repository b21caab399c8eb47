"""TRL's fused LM head answered by gem_fast's kernels.

TRL 1.16's trainers add their own fused head (``trl.trainer.utils.add_fused_lm_head``) and read
per-token statistics through ``model(..., labels=labels, fused_lm_head=True)``. A model patched by
:func:`gem_fast.integrations.patch_causal_lm` after that answers those calls here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers.utils import ModelOutput

__all__ = ["TrlFusedOutput", "trl_fused_forward"]


@dataclass
class TrlFusedOutput(ModelOutput):
    """What a patched model returns for TRL's ``fused_lm_head=True`` calls (the fields TRL's
    trainers read from its own ``FusedCausalLMOutput``): per-token fields [B, L-1], 0 where the
    label is -100; ``loss`` the mean negative log-likelihood (or the sum over ``num_items_in_batch``)."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None


def trl_fused_forward(replaced_forward: Callable, fused_head: Callable, args: tuple, kwargs: dict,
                      labels: torch.Tensor | None, shift_labels: torch.Tensor | None, num_items_in_batch: Any,
                      temperature: float) -> TrlFusedOutput:
    """Answer ``model(*args, labels=..., fused_lm_head=True, **kwargs)``. ``labels`` [B, L] are
    aligned with ``input_ids`` (the label at t+1 is scored from position t), or ``shift_labels``
    [B, L] are pre-shifted. ``fused_head(args, kwargs, targets, temperature, **kernel_options)``
    runs the backbone and the kernel and returns ``(backbone outputs, *kernel results)``;
    ``replaced_forward`` is the forward the patch replaced."""
    targets = shift_labels if shift_labels is not None else torch.nn.functional.pad(labels[:, 1:], (0, 1),
                                                                                    value=-100)
    _, logprobs, entropy = fused_head(args, {**kwargs, "use_cache": False}, targets, temperature)
    if shift_labels is None:
        targets, logprobs, entropy = targets[:, :-1], logprobs[:, :-1], entropy[:, :-1]
    mask = targets != -100
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return TrlFusedOutput(loss=-logprobs.sum() / count, log_probs=logprobs, entropy=entropy, label_mask=mask)
