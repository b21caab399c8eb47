"""Tokenising: prompt/response rows as padded token ids with response masks, prompts for generation,
and prompts joined with their generations (:class:`EncodedBatch`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from gem_fast.data.records import PreferencePair, Prompt

__all__ = [
    "EncodedBatch",
    "TokenizerLike",
    "encode_prompt_responses",
    "encode_pairs",
    "encode_prompts",
    "join_prompt_and_generation",
]


class TokenizerLike(Protocol):
    """The part of a Hugging Face tokenizer that gem_fast uses."""

    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def batch_decode(self, sequences: list[list[int]]) -> list[str]: ...


@dataclass(frozen=True)
class EncodedBatch:
    """Prompt+response token ids of N rows, padded to a common length L.

    ``input_ids`` [N, L] int64, ``attention_mask`` [N, L] int64 (1 = real token),
    ``response_mask`` [N, L] bool (True on response tokens only; prompt and padding False).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device | str) -> "EncodedBatch":
        """The same batch on ``device``."""
        return EncodedBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device)
        )

    def rows(self, index: slice | torch.Tensor) -> "EncodedBatch":
        """The rows at ``index`` (a slice or an int64 tensor)."""
        return EncodedBatch(self.input_ids[index], self.attention_mask[index], self.response_mask[index])


def _format_prompt(tokenizer: TokenizerLike, prompt: Prompt, chat_template: bool) -> list[int]:
    """Token ids of a text prompt (as a user message with ``chat_template``) or of chat messages."""
    if isinstance(prompt, str) and not chat_template:
        return tokenizer.encode(prompt, add_special_tokens=True)
    if not getattr(tokenizer, "chat_template", None):
        why = "chat_template=True" if isinstance(prompt, str) else "chat rows ({\"messages\"})"
        raise ValueError(f"{why} but the tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        messages, add_generation_prompt=True, tokenize=False
    )
    # The template already holds every special token the model expects.
    return tokenizer.encode(text, add_special_tokens=False)


def encode_prompt_responses(
    tokenizer: TokenizerLike,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    *,
    max_length: int = 1024,
    append_eos: bool = True,
    chat_template: bool = False,
    padding_side: str = "right",
) -> EncodedBatch:
    """Tokenise ``prompt + response`` rows and mark which positions are response tokens.

    A prompt is text (wrapped as a user message when ``chat_template``) or chat messages
    (always rendered by the tokenizer's chat template, with the generation prompt).

    Prompt and response are encoded separately and concatenated, so the response mask is
    exact (no BPE merge across the boundary). ``append_eos`` ends each response with the EOS
    token, so log π(a|q) includes the decision to stop. Rows longer than ``max_length`` lose
    prompt tokens from the left first; a response is cut on the right only when it alone
    would leave no prompt token (the first response token needs a position that predicts it).
    """
    if len(prompts) != len(responses):
        raise ValueError(
            f"prompts and responses differ in length: {len(prompts)} vs {len(responses)}"
        )
    if not prompts:
        raise ValueError("prompts is empty")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise ValueError("append_eos=True but the tokenizer has no eos_token_id")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("the tokenizer has neither pad_token_id nor eos_token_id")

    rows: list[tuple[list[int], list[int]]] = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt_ids = _format_prompt(tokenizer, prompt, chat_template)
        response_ids = tokenizer.encode(response, add_special_tokens=False)
        if append_eos:
            response_ids = response_ids + [eos]
        if not prompt_ids:
            raise ValueError(f"prompts[{i}] encodes to no tokens")
        if not response_ids:
            raise ValueError(f"responses[{i}] encodes to no tokens")
        response_ids = response_ids[: max_length - 1]
        prompt_ids = prompt_ids[-(max_length - len(response_ids)) :]
        rows.append((prompt_ids, response_ids))

    length = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    response_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (prompt_ids, response_ids) in enumerate(rows):
        n = len(prompt_ids) + len(response_ids)
        start = 0 if padding_side == "right" else length - n
        input_ids[i, start : start + n] = torch.tensor(prompt_ids + response_ids)
        attention_mask[i, start : start + n] = 1
        response_mask[i, start + len(prompt_ids) : start + n] = True
    return EncodedBatch(input_ids, attention_mask, response_mask)


def encode_prompts(
    tokenizer: TokenizerLike, prompts: Sequence[str], *, max_length: int = 1024, chat_template: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, both [B, P] int64, for generation.

    Each prompt keeps its last ``max_length`` tokens (the end is what the model continues).
    """
    if not prompts:
        raise ValueError("prompts is empty")
    ids = [_format_prompt(tokenizer, p, chat_template)[-max_length:] for p in prompts]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompts[{i}] encodes to no tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad if pad is not None else 0, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def encode_pairs(
    tokenizer: TokenizerLike,
    pairs: Sequence[PreferencePair],
    *,
    max_length: int = 1024,
    chat_template: bool = False,
    padding_side: str = "right",
) -> EncodedBatch:
    """2n rows for n pairs: rows ``0..n-1`` are the chosen responses, ``n..2n-1`` the rejected."""
    return encode_prompt_responses(
        tokenizer,
        [p.prompt for p in pairs] * 2,
        [p.chosen for p in pairs] + [p.rejected for p in pairs],
        max_length=max_length,
        chat_template=chat_template,
        padding_side=padding_side,
    )


def join_prompt_and_generation(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sequences: torch.Tensor,
    generation_mask: torch.Tensor,
    group_sizes: torch.Tensor | None = None,
) -> EncodedBatch:
    """Prompt rows [B, P] (any padding) joined with their generations [N, T] -> [N, P+T].

    Generation rows are prompt-major: ``group_sizes`` [B] int64 rows per prompt, or None for
    k = N / B each (row ``b*k + j`` is candidate j of prompt b, as
    :func:`gem_fast.sampling.sample_group` returns them); ``generation_mask`` marks the valid
    generated tokens, which become the response tokens.
    """
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError("prompt_ids and prompt_mask must both have shape [B, P]")
    if sequences.dim() != 2 or generation_mask.shape != sequences.shape:
        raise ValueError("sequences and generation_mask must both have shape [N, T]")
    b = prompt_ids.shape[0]
    if group_sizes is None:
        if sequences.shape[0] % b:
            raise ValueError(f"sequences has {sequences.shape[0]} rows, not a multiple of B={b}")
        repeats: int | torch.Tensor = sequences.shape[0] // b
    elif group_sizes.shape != (b,) or int(group_sizes.sum()) != sequences.shape[0]:
        raise ValueError(f"group_sizes must be [{b}] and sum to the {sequences.shape[0]} rows of sequences")
    else:
        repeats = group_sizes.to(prompt_ids.device)
    generated = generation_mask.bool()
    prompt_rows = torch.zeros_like(prompt_mask, dtype=torch.bool).repeat_interleave(repeats, 0)
    return EncodedBatch(
        input_ids=torch.cat((prompt_ids.repeat_interleave(repeats, 0), sequences), dim=1).long(),
        attention_mask=torch.cat((prompt_mask.repeat_interleave(repeats, 0).long(), generated.long()), dim=1),
        response_mask=torch.cat((prompt_rows, generated), dim=1),
    )
