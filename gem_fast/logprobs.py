"""Response log-probabilities of a causal LM, from its final hidden states and the fused kernels.

The hidden state at position t predicts token t+1, so the log-prob of a response token at
position t+1 is read from position t: targets are ``input_ids[:, 1:]`` where the response mask
is set, ``ignore_index`` elsewhere (prompt and padding), and hidden states are taken at
positions ``0 .. L-2``. Position ids come from the attention mask, so left- and
right-padded batches give the same numbers. The ``[tokens, vocab]`` logits are never built:
``hidden @ lm_head.weight.T`` is reduced inside :mod:`gem_fast.kernels`.

The head the kernels take is the model's own as its forward applies it (:func:`output_head`: the
output embeddings, a cut vocabulary, the family's logit scale and soft-cap, read from the config).
:func:`run_head` is the one path from a batch to a head kernel, prefix-shared or not: the policy's
loss, the sequence log-probs, the per-token log-probs and entropies (scoring, gates) all go
through it, and :mod:`gem_fast.integrations` applies the same :meth:`OutputHead.apply`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

import torch
from tqdm.auto import tqdm

from gem_fast.data import EncodedBatch, PreferencePair, TokenizerLike, encode_pairs
from gem_fast.kernels import fused_logprob_entropy
from gem_fast.prefix_sharing import pack_groups, packed_response_hidden, prefix_sharing_unsupported

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "OutputHead",
    "output_head",
    "output_embeddings",
    "describe_model",
    "PairLogprobs",
    "response_targets",
    "response_hidden",
    "run_head",
    "response_logprob_entropy",
    "sequence_logprobs",
    "pair_logprobs",
]

IGNORE_INDEX = -100
R = TypeVar("R")


class OutputHead(NamedTuple):
    """The LM head as the kernels take it, from the output embeddings' input h to the model's
    logits: z = softcap·tanh(scale·(W h + b) / softcap) (no soft-cap: z = scale·(W h + b))."""

    weight: torch.Tensor  # [V, H], cut to the vocabulary the model's logits keep
    bias: torch.Tensor | None  # [V]
    logit_scale: float
    logit_softcap: float | None

    def apply(self, kernel: Callable[..., R], hidden: torch.Tensor, targets: torch.Tensor, *weights: torch.Tensor,
              **options: Any) -> R:
        """``kernel`` (:func:`~gem_fast.kernels.fused_logprob_entropy`, ``weighted_logprob_loss``) on
        ``hidden`` [..., H] and ``targets`` [...] through this head: its weight, bias, scale and soft-cap;
        ``weights`` (loss weights like ``targets``) and ``options`` go to the kernel as they are."""
        return kernel(hidden, self.weight, targets, *weights, bias=self.bias, logit_scale=self.logit_scale,
                      logit_softcap=self.logit_softcap, **options)


# What each family's forward multiplies the head's output by (transformers' modeling code, 5.17-5.24):
# (model type of the text config, or a prefix ending in "*") -> (config attribute, exponent).
_LOGIT_SCALES = {
    "cohere*": ("logit_scale", 1),  # cohere, cohere2, cohere2_moe, cohere_compass
    "granite*": ("logits_scaling", -1),  # granite(_swa), granitemoe(_swa, shared, hybrid), granite vision text
    "hyperclovax": ("logits_scaling", 1),  # MuP: multiplies where granite divides
    "falcon_h1": ("lm_head_multiplier", 1),
}
# The soft-cap softcap·tanh(z / softcap) after it: gemma2/3/3n/4, inkling2, mistral_large4, nanochat,
# vaultgemma name it final_logit_softcapping; recurrent_gemma logits_soft_cap; xlstm output_logit_soft_cap.
_SOFTCAP_ATTRIBUTES = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# Gemma3ForConditionalGeneration applies no final soft-cap (5.17-5.24), though its text config has one.
_SOFTCAP_UNREAD = ("gemma3",)


def _logit_scale(text_config: Any) -> float:
    model_type = text_config.model_type
    for pattern, (attribute, exponent) in _LOGIT_SCALES.items():
        if model_type == pattern or (pattern.endswith("*") and model_type.startswith(pattern[:-1])):
            value = getattr(text_config, attribute, None)
            return 1.0 if value is None else float(value) ** exponent
    return 1.0


def describe_model(model: torch.nn.Module) -> str:
    """The model's type and class, as error messages name it."""
    return f"type {getattr(getattr(model, 'config', None), 'model_type', None)!r} ({type(model).__name__})"


def output_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """The output-embeddings module of a causal LM; ValueError naming the model where it has none with one weight."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or not hasattr(model, "config"):
        raise ValueError(f"model: {describe_model(model)} is not a causal LM with a config and output embeddings "
                         "that hold one weight (get_output_embeddings())")
    return head


def output_head(model: torch.nn.Module) -> OutputHead:
    """The head of a Hugging Face causal LM: its output embeddings, cut to ``unpadded_vocab_size``
    where the family cuts its logits (inkling), with the logit scale and soft-cap its forward
    applies, read from the config (the text config of a multimodal model)."""
    head = output_embeddings(model)
    text_config = model.config.get_text_config(decoder=True)
    weight, bias = head.weight, getattr(head, "bias", None)
    vocab = getattr(text_config, "unpadded_vocab_size", None)
    if vocab is not None and vocab < weight.shape[0]:
        weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
    softcap = None if model.config.model_type in _SOFTCAP_UNREAD else next(
        (getattr(text_config, a) for a in _SOFTCAP_ATTRIBUTES if getattr(text_config, a, None) is not None), None)
    return OutputHead(weight, bias, _logit_scale(text_config), None if softcap is None else float(softcap))


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


def run_head(kernel: Callable[..., R], model: torch.nn.Module, batch: EncodedBatch, *,
             token_weights: torch.Tensor | None = None, prefix_sharing: bool = False, backend: str = "auto",
             **options: Any) -> tuple[R, torch.Tensor | None]:
    """``kernel`` (a :mod:`gem_fast.kernels` head kernel) on the response tokens of ``batch`` with ``model``'s head.

    Repeated layout: the [N, L-1] hidden states and targets of :func:`response_hidden` /
    :func:`response_targets`, prompt and padding rows dropped inside the kernel (one host sync skips
    their GEMMs; most of a preference batch). ``prefix_sharing``: the M response tokens of the packed
    layout (:func:`gem_fast.prefix_sharing.pack_groups`), ``token_weights`` [N, L-1] gathered to them.
    ``options`` (``temperature``...) go to the kernel. Returns the kernel's result and, packed, the
    [M] int64 index of each token in the flattened [N, L-1] grid (``PackedGroups.source``), else None.
    Call it inside the forward that owns the head (FSDP2 gathers ``lm_head.weight`` there).
    """
    head = output_head(model)
    weights = () if token_weights is None else (token_weights,)
    if prefix_sharing:
        packed = pack_groups(batch)
        hidden = packed_response_hidden(model, packed)
        weights = tuple(w.reshape(-1)[packed.source] for w in weights)
        return head.apply(kernel, hidden, packed.targets, *weights, ignore_index=IGNORE_INDEX, backend=backend,
                          **options), packed.source
    return head.apply(kernel, response_hidden(model, batch), response_targets(batch), *weights,
                      ignore_index=IGNORE_INDEX, backend=backend, drop_ignored_rows=True, **options), None


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
    (logp, _), source = run_head(fused_logprob_entropy, model, batch, prefix_sharing=prefix_sharing, backend=backend)
    rows, width = batch.input_ids.shape[0], batch.input_ids.shape[1] - 1
    total = logp.sum(-1) if source is None else logp.new_zeros(rows).index_add(0, source // width, logp)
    if length_normalize:
        total = total / batch.response_mask[:, 1:].sum(-1).clamp(min=1)
    return total


def response_logprob_entropy(model: torch.nn.Module, batch: EncodedBatch, *, temperature: float = 1.0,
                             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-prob of each response token and entropy (nats) of softmax(logits / temperature) at
    its predicting position: two [N, L-1] float32, 0 off the response (as the sampler's ``token_entropy``)."""
    return run_head(fused_logprob_entropy, model, batch, temperature=temperature, backend=backend)[0]


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
