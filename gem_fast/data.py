"""Training data: JSONL loaders and prompt/response tokenisation with response masks.

A line of a preference file is one object ``{"prompt": str, "chosen": str, "rejected": str}``
with an optional ``"subset": str`` (e.g. the RewardBench category) used for per-subset
accuracy. SFT (:func:`load_completions`) also reads ``{"prompt": str, "completion": str}`` rows
and chat rows ``{"messages": [{"role", "content"}, ...]}`` whose last message, the assistant's,
is the completion and whose earlier messages are the prompt, rendered by the chat template.
Blank lines are skipped. Anything else raises ``ValueError`` naming the file and the 1-based
line number, so a broken row in a large file can be found at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, Union

import torch

from gem_fast.readers import jsonl_rows, open_text

__all__ = [
    "PreferencePair",
    "Message",
    "Prompt",
    "Completion",
    "EncodedBatch",
    "TokenizerLike",
    "load_preference_jsonl",
    "load_completions",
    "load_group_rows",
    "encode_prompt_responses",
    "encode_pairs",
    "encode_prompts",
    "join_prompt_and_generation",
]

_REQUIRED_FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One human preference: ``chosen`` is preferred over ``rejected`` as a reply to ``prompt``."""

    prompt: str
    chosen: str
    rejected: str
    subset: str | None = None
    answer: str | None = None  # what a correct response states after "Answer:" (the built-in tasks have one)


Message = Mapping[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant" | ..., "content": str}``."""
Prompt = Union[str, Sequence[Message]]
"""A prompt as text, or as the chat messages before a reply (always rendered by the chat template)."""


@dataclass(frozen=True)
class Completion:
    """One SFT example: ``completion`` is the reply to train on after ``prompt``."""

    prompt: Prompt
    completion: str


def _check_text(row: Mapping[str, Any], name: str, where: str) -> str:
    """``row[name]`` when it is a non-blank string; ``ValueError`` at ``where`` otherwise."""
    if name not in row:
        raise ValueError(f"{where}: missing field {name!r}")
    if not isinstance(row[name], str):
        raise ValueError(f"{where}: field {name!r} must be a string")
    if not row[name].strip():
        raise ValueError(f"{where}: field {name!r} is empty")
    return row[name]


def _chat_completion(messages: Any, where: str) -> Completion:
    """A ``messages`` list as (earlier messages, last assistant message's content)."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError(f"{where}: 'messages' must be a list of at least two messages (a prompt and the reply)")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's reply, got role "
                         f"{messages[-1]['role']!r}")
    _check_text(messages[-1], "content", f"{where}: messages[{len(messages) - 1}]")
    return Completion(tuple(dict(m) for m in messages[:-1]), messages[-1]["content"])


def load_completions(path: str | Path) -> list[Completion]:
    """SFT examples of a JSONL file: ``{"messages"}`` chat rows, ``{"prompt", "completion"}`` rows, and
    preference rows (their ``chosen`` is the completion), mixed freely.

    Raises ``ValueError`` with ``path:line`` for invalid JSON, a row of none of these shapes, or a
    missing, non-string or empty field.
    """
    path = Path(path)
    examples: list[Completion] = []
    with open_text(path) as handle:
        for where, row in jsonl_rows(handle, path):
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if "messages" in row:
                examples.append(_chat_completion(row["messages"], where))
            elif "completion" in row:
                examples.append(Completion(_check_text(row, "prompt", where), _check_text(row, "completion", where)))
            elif "chosen" in row:  # checked whole, as every objective reads it
                prompt, chosen, _ = (_check_text(row, field, where) for field in _REQUIRED_FIELDS)
                examples.append(Completion(prompt, chosen))
            else:
                raise ValueError(f"{where}: expected {{prompt, completion}}, {{messages}} or {{prompt, chosen, "
                                 f"rejected}} fields, got {sorted(row)}")
    return examples


def load_group_rows(path: str | Path) -> list[str | PreferencePair]:
    """SEGA's rows: a preference row (``prompt``, ``chosen``, ``rejected``) as a :class:`PreferencePair`, whose
    human responses can join its group, any other row as its ``prompt`` (the unlabelled prompts); mixed freely.
    ``ValueError`` with ``path:line`` for a byte that is not UTF-8, invalid JSON, or a missing or empty prompt
    (or, in a preference row, response); other fields are ignored.
    """
    path = Path(path)
    rows: list[str | PreferencePair] = []
    with open_text(path) as handle:
        for where, row in jsonl_rows(handle, path):
            row = row if isinstance(row, dict) else {}
            if "chosen" in row or "rejected" in row:
                prompt, chosen, rejected = (_check_text(row, name, where) for name in _REQUIRED_FIELDS)
                rows.append(PreferencePair(prompt, chosen, rejected, answer=row.get("answer")))
            else:
                rows.append(_check_text(row, "prompt", where))
    return rows


def load_preference_jsonl(path: str | Path, *, limit: int | None = None) -> list[PreferencePair]:
    """Read preference pairs from a JSONL file (at most ``limit`` of them, in file order).

    Raises ``ValueError`` with ``path:line`` for a byte that is not UTF-8, invalid JSON, a line that is not an object,
    a missing or non-string field, or an empty (whitespace-only) prompt or response.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    path = Path(path)
    pairs: list[PreferencePair] = []
    with open_text(path) as handle:
        for where, row in jsonl_rows(handle, path):
            if limit is not None and len(pairs) >= limit:
                break
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for field in _REQUIRED_FIELDS:
                _check_text(row, field, where)
            for optional in ("subset", "answer"):
                if row.get(optional) is not None and not isinstance(row[optional], str):
                    raise ValueError(f"{where}: field {optional!r} must be a string")
            pairs.append(PreferencePair(row["prompt"], row["chosen"], row["rejected"], row.get("subset"),
                                        row.get("answer")))
    return pairs


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
