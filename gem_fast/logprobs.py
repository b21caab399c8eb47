"""Response log-probabilities of a causal LM, from its final hidden states and the fused kernels.

The hidden state at position t predicts token t+1, so the log-prob of a response token at
position t+1 is read from position t: targets are ``input_ids[:, 1:]`` where the response mask
is set, ``ignore_index`` elsewhere (prompt and padding), and hidden states are taken at
positions ``0 .. L-2``. Position ids come from the attention mask, so left- and
right-padded batches give the same numbers. The ``[tokens, vocab]`` logits are never built:
``hidden @ lm_head.weight.T`` is reduced inside :mod:`gem_fast.kernels`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from gem_fast.data import EncodedBatch, PreferencePair, TokenizerLike, encode_pairs
from gem_fast.integrations import output_head
from gem_fast.kernels import fused_logprob_entropy
from gem_fast.prefix_sharing import pack_groups, packed_response_hidden, prefix_sharing_unsupported

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "PairLogprobs",
    "response_targets",
    "response_hidden",
    "response_logprob_entropy",
    "sequence_logprobs",
    "pair_logprobs",
]

IGNORE_INDEX = -100


def response_targets(batch: EncodedBatch, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[N, L-1] int64: the token each position 0..L-2 predicts, ``ignore_index`` off the response."""
    return torch.where(batch.response_mask[:, 1:], batch.input_ids[:, 1:], ignore_index)


def response_hidden(model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
    """[N, L-1, H] final (post-norm) hidden states at positions 0..L-2 of ``batch``."""
    position_ids = (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model.base_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    return out.last_hidden_state[:, :-1]


def sequence_logprobs(
    model: torch.nn.Module,
    batch: EncodedBatch,
    *,
    length_normalize: bool = False,
    backend: str = "auto",
    prefix_sharing: bool = False,
) -> torch.Tensor:
    """log π(response | prompt) per row, [N] float32 (nats): the sum over response tokens.

    ``length_normalize=True`` divides by the number of response tokens (mean per token).
    ``prefix_sharing``: rows with the same prompt run as one packed row
    (:mod:`gem_fast.prefix_sharing`); the same numbers. Differentiable w.r.t. the model's
    parameters when grad is enabled.
    """
    head = output_head(model)
    targets = response_targets(batch)
    kernel_args = dict(bias=head.bias, logit_scale=head.logit_scale, logit_softcap=head.logit_softcap,
                       ignore_index=IGNORE_INDEX, backend=backend)
    if prefix_sharing:
        packed = pack_groups(batch)
        logp, _ = fused_logprob_entropy(packed_response_hidden(model, packed), head.weight, packed.targets,
                                        **kernel_args)
        total = logp.new_zeros(targets.shape[0]).index_add(0, packed.source // targets.shape[1], logp)
    else:
        # Prompt and padding rows are most of a preference batch: one host sync to skip their GEMMs.
        logp, _ = fused_logprob_entropy(response_hidden(model, batch), head.weight, targets, drop_ignored_rows=True,
                                        **kernel_args)
        total = logp.sum(-1)
    if length_normalize:
        total = total / (targets != IGNORE_INDEX).sum(-1).clamp(min=1)
    return total


def response_logprob_entropy(model: torch.nn.Module, batch: EncodedBatch, *, temperature: float = 1.0,
                             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-prob of each response token and entropy (nats) of softmax(logits / temperature) at
    its predicting position: two [N, L-1] float32, 0 off the response (as the sampler's ``token_entropy``)."""
    head = output_head(model)
    return fused_logprob_entropy(
        response_hidden(model, batch), head.weight, response_targets(batch), bias=head.bias,
        logit_scale=head.logit_scale, logit_softcap=head.logit_softcap, temperature=temperature,
        ignore_index=IGNORE_INDEX, backend=backend, drop_ignored_rows=True)


@dataclass(frozen=True)
class PairLogprobs:
    """Summed response log-probs (float32 [n], nats) and response lengths (int64 [n]) of n pairs."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def values(self, *, length_normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen, rejected)`` log-probs, summed or per response token."""
        if not length_normalize:
            return self.chosen, self.rejected
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)

    def select(self, index: torch.Tensor) -> "PairLogprobs":
        """The pairs at ``index`` (int64 [m]), e.g. a training batch's rows of a cached table."""
        return PairLogprobs(
            self.chosen[index], self.rejected[index], self.chosen_tokens[index], self.rejected_tokens[index]
        )


@torch.no_grad()
def pair_logprobs(
    model: torch.nn.Module,
    tokenizer: TokenizerLike,
    pairs: Sequence[PreferencePair],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    chat_template: bool = False,
    backend: str = "auto",
    progress: bool | None = False,
    desc: str = "pair log-probs",
    prefix_sharing: bool | None = None,
) -> PairLogprobs:
    """log π(chosen | prompt) and log π(rejected | prompt) of every pair, on the CPU.

    Runs without gradients in batches of ``batch_size`` pairs (chosen and rejected share one
    forward); used for evaluation and to compute a reference model's log-probs once.
    ``prefix_sharing``: each pair's prompt computed once, its two responses packed after it
    (:mod:`gem_fast.prefix_sharing`; the same numbers up to float rounding); None: where the model's
    attention takes that layout (which ran is logged). ``progress``: a tqdm bar ``desc`` over the
    pairs (None: only on a TTY).
    """
    if not pairs:
        raise ValueError("pairs is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    if prefix_sharing is None:
        reason = prefix_sharing_unsupported(model, device)
        prefix_sharing = reason is None
        logger.info("%s: %s", desc, "each prompt computed once for both responses" if prefix_sharing
                    else f"prompts repeated ({reason})")
    sums, counts = [], []
    with tqdm(total=len(pairs), desc=desc, unit="pair", disable=None if progress is None else not progress) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = encode_pairs(tokenizer, chunk, max_length=max_length, chat_template=chat_template).to(device)
            sums.append(sequence_logprobs(model, batch, backend=backend, prefix_sharing=prefix_sharing).cpu())
            counts.append(batch.response_mask[:, 1:].sum(-1).cpu())
            bar.update(len(chunk))
    # Each chunk holds its chosen rows first, then its rejected rows (encode_pairs).
    rejected = torch.cat([torch.arange(len(s)) >= len(s) // 2 for s in sums])
    total, length = torch.cat(sums), torch.cat(counts)
    return PairLogprobs(total[~rejected], total[rejected], length[~rejected], length[rejected])
