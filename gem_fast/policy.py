"""The trained policy as the FSDP root module, and the micro-batches it takes.

:class:`PolicyLoss` computes a micro-batch's loss inside its own ``forward`` from the final hidden
states and the LM head with :mod:`gem_fast.kernels` (no ``[tokens, vocab]`` logits), so FSDP2's
gathered ``lm_head.weight`` is in scope. It sits below the loop and the objectives: objectives
build :class:`MicroBatch` es and the loop feeds them to the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from gem_fast.data import EncodedBatch, PreferencePair
from gem_fast.kernels import weighted_logprob_loss
from gem_fast.logprobs import PairLogprobs, pair_logprobs, response_logprob_entropy, run_head
from gem_fast.sampling import GroupSample, sample_group

__all__ = ["MicroBatch", "StepBatches", "PairLoss", "PolicyLoss"]


@dataclass(frozen=True)
class MicroBatch:
    """Rows of one micro-step: loss weights [N, L-1] float32 per predicted token (SFT, SEGA), or the
    pairs' reference log-probs (DPO, IPO; rows chosen-then-rejected) and the factor on their mean loss."""

    batch: EncodedBatch
    token_weights: torch.Tensor | None = None
    reference: PairLogprobs | None = None
    loss_scale: float = 1.0


StepBatches = tuple[list[MicroBatch], dict[str, torch.Tensor]]
"""A step's micro-batches and this rank's step statistics (0-dim tensors, logged as the mean over ranks)."""


class PairLoss(Protocol):
    """Mean loss over the n pairs of ``batch`` (2n rows, chosen first) given their reference log-probs;
    ``prefix_sharing``: each pair's prompt computed once (:mod:`gem_fast.prefix_sharing`)."""

    def __call__(self, model: nn.Module, batch: EncodedBatch, reference: PairLogprobs, *,
                 backend: str, prefix_sharing: bool) -> torch.Tensor: ...


class PolicyLoss(nn.Module):
    """Root module: ``forward`` returns a micro-batch's loss (float32 scalar).

    ``-Σ_t w_t·log π(y_t)`` with per-token weights, or ``pair_loss`` (an objective's, e.g. DPO's)
    when reference log-probs are given. Computing the loss here, not in a helper outside
    ``forward``, keeps FSDP2's gathered ``lm_head.weight`` in scope (a side method would see the
    sharded DTensor). ``prefix_sharing``: rows that share a prompt run as one packed row, the prompt
    computed once (:mod:`gem_fast.prefix_sharing`; SEGA's k candidates, a pair's two responses).
    """

    # Gathered like forward (gem_fast.distributed.parallelize).
    fsdp_forward_methods = ("sample", "pair_logprobs", "response_logprob_entropy")

    def __init__(self, model: nn.Module, *, backend: str = "auto", pair_loss: PairLoss | None = None,
                 prefix_sharing: bool = False) -> None:
        super().__init__()
        self.model = model
        self.backend = backend
        self.pair_loss = pair_loss
        self.prefix_sharing = prefix_sharing

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
        token_weights: torch.Tensor | None = None, reference: PairLogprobs | None = None,
    ) -> torch.Tensor:
        """input_ids/attention_mask [N, L] int, response_mask [N, L] bool; token_weights [N, L-1] float32
        (SFT, SEGA), or ``reference`` log-probs of the N/2 pairs (DPO/IPO: mean loss over the pairs)."""
        batch = EncodedBatch(input_ids, attention_mask, response_mask)
        if reference is not None:
            if self.pair_loss is None:
                raise ValueError("reference log-probs given to a PolicyLoss without a pair_loss")
            return self.pair_loss(self.model, batch, reference, backend=self.backend,
                                  prefix_sharing=self.prefix_sharing)
        # Here, inside forward: FSDP2's gathered lm_head.weight is what run_head's head reads.
        return run_head(weighted_logprob_loss, self.model, batch, token_weights=token_weights,
                        prefix_sharing=self.prefix_sharing, backend=self.backend)[0]

    def sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> GroupSample:
        """:func:`gem_fast.sampling.sample_group` on the wrapped model with this policy's kernel backend;
        registered as an FSDP forward method."""
        return sample_group(self.model, input_ids, attention_mask, backend=self.backend, **kwargs)

    def pair_logprobs(self, tokenizer: Any, pairs: list[PreferencePair], **kwargs: Any) -> PairLogprobs:
        """:func:`gem_fast.logprobs.pair_logprobs` of the wrapped model (no grad); an FSDP forward method."""
        return pair_logprobs(self.model, tokenizer, pairs, backend=self.backend, **kwargs)

    @torch.no_grad()
    def response_logprob_entropy(self, batch: EncodedBatch, *, temperature: float = 1.0
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`gem_fast.logprobs.response_logprob_entropy` of the wrapped model (no grad); an FSDP forward
        method (SEGA's anchored groups score the human responses with it)."""
        return response_logprob_entropy(self.model, batch, temperature=temperature, backend=self.backend)
