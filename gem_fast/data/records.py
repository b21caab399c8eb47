"""The records gem_fast trains on (:class:`PreferencePair`, :class:`Completion`) and the loaders of its
own JSON Lines files.

A line of a preference file is one object ``{"prompt": str, "chosen": str, "rejected": str}``
with an optional ``"subset": str`` (e.g. the RewardBench category) used for per-subset
accuracy. SFT (:func:`load_completions`) also reads ``{"prompt": str, "completion": str}`` rows
and chat rows ``{"messages": [{"role", "content"}, ...]}`` whose last message, the assistant's,
is the completion and whose earlier messages are the prompt, rendered by the chat template.
Blank lines are skipped. Anything else raises ``ValueError`` naming the file and the 1-based
line number, so a broken row in a large file can be found at once. Other datasets' formats are
converted to these records by :mod:`gem_fast.data.formats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from gem_fast.data.files import jsonl_rows, open_text

__all__ = ["PreferencePair", "Message", "Prompt", "Completion", "load_preference_jsonl", "load_completions",
           "load_group_rows"]

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
