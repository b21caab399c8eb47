"""Dataset adapters: the preference sets the GEM paper uses, read from local files into PreferencePair.

Files are read by :func:`gem_fast.data.files.iter_rows` (JSON Lines, JSON, Parquet, ``datasets``
folders), each row with its location for error messages.

Formats (``format=``, or ``"auto"`` to detect from the first row's fields):

* ``pairs``: ``prompt``, ``chosen``, ``rejected`` strings, optional ``subset`` (gem_fast's own).
* ``rewardbench``: the same with ``subset`` required (allenai/reward-bench).
* ``ultrafeedback``: ``prompt`` plus ``chosen``/``rejected`` message lists
  (HuggingFaceH4/ultrafeedback_binarized).
* ``skywork``: ``chosen``/``rejected`` message lists, optional ``source`` kept as the subset
  (Skywork-Reward-Preference-80K).
* ``pku_saferlhf``: ``prompt``, ``response_0``, ``response_1``, ``better_response_id``,
  ``safer_response_id``; ``preference=`` picks ``"better"`` (default) or ``"safer"``.
* ``icliniq``: ``question``, ``answer_pos``, ``answer_neg``.

A message list ``[{"role", "content"}, ...]`` must end with the assistant reply; the turns before
it are the prompt and must be the same in ``chosen`` and ``rejected``. Prompts are rendered by
:func:`render_prompt`: through the tokenizer's chat template when a tokenizer is given (then
encode them with ``chat_template=False`` downstream), else a lone user turn is its bare text and
longer conversations become ``role: content`` lines.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from gem_fast.data.records import PreferencePair
from gem_fast.data.files import Row, iter_rows

__all__ = [
    "FORMATS",
    "PREFERENCES",
    "ChatTemplateTokenizer",
    "detect_format",
    "detect_file_format",
    "row_to_pair",
    "load_pairs",
    "render_prompt",
    "split_pairs",
    "check_disjoint",
    "write_pairs_jsonl",
]

Turn = dict[str, str]
# (prompt turns, chosen reply, rejected reply, subset)
_Parsed = tuple[list[Turn], str, str, str | None]

PREFERENCES = ("better", "safer")


class ChatTemplateTokenizer(Protocol):
    """The part of a Hugging Face tokenizer that renders prompts."""

    chat_template: str | None

    def apply_chat_template(
        self, conversation: list[Turn], *, add_generation_prompt: bool, tokenize: bool
    ) -> Any: ...


# ---------------------------------------------------------------- reading rows


# ---------------------------------------------------------------- field access


def _field(row: Row, name: str, where: str) -> Any:
    if name not in row:
        raise ValueError(f"{where}: missing field {name!r}")
    return row[name]


def _text(row: Row, name: str, where: str) -> str:
    value = _field(row, name, where)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: field {name!r} is empty")
    return value


def _optional_text(row: Row, name: str, where: str) -> str | None:
    # Absent and null are alike: columnar files hold a null where a row has no value.
    return None if row.get(name) is None else _text(row, name, where)


def _messages(row: Row, name: str, where: str) -> list[Turn]:
    value = _field(row, name, where)
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: field {name!r} must be a non-empty list of messages")
    turns = []
    for i, message in enumerate(value):
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ValueError(f"{where}: {name}[{i}] must be an object with string 'role' and 'content'")
        turns.append({"role": message["role"], "content": message["content"]})
    return turns


def _split_reply(turns: list[Turn], name: str, where: str) -> tuple[list[Turn], str]:
    """(the turns before the final assistant message, that message's content)."""
    role, reply = turns[-1]["role"], turns[-1]["content"]
    if role != "assistant":
        raise ValueError(f"{where}: field {name!r} ends with a {role!r} message, expected 'assistant'")
    if not reply.strip():
        raise ValueError(f"{where}: field {name!r} has an empty final assistant message")
    return turns[:-1], reply


def _user(content: str) -> list[Turn]:
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------- formats


def _from_strings(
    row: Row,
    where: str,
    preference: str | None,
    *,
    prompt: str,
    chosen: str,
    rejected: str,
    subset: str | None = None,
    subset_required: bool = False,
) -> _Parsed:
    if subset is None:
        subset_value = None
    elif subset_required:
        subset_value = _text(row, subset, where)
    else:
        subset_value = _optional_text(row, subset, where)
    turns = _user(_text(row, prompt, where))
    return turns, _text(row, chosen, where), _text(row, rejected, where), subset_value


def _from_messages(
    row: Row, where: str, preference: str | None, *, prompt: str | None = None, subset: str | None = None
) -> _Parsed:
    turns, chosen = _split_reply(_messages(row, "chosen", where), "chosen", where)
    rejected_turns, rejected = _split_reply(_messages(row, "rejected", where), "rejected", where)
    if turns != rejected_turns:
        raise ValueError(
            f"{where}: 'chosen' and 'rejected' differ before their final assistant message; "
            "a pair must answer the same prompt turns"
        )
    if prompt is not None:
        prompt_text = _text(row, prompt, where)
        if not turns:  # the lists hold the replies only; the prompt field is the user turn
            turns = _user(prompt_text)
        else:
            first_user = next((t["content"] for t in turns if t["role"] == "user"), None)
            if first_user is None or first_user.strip() != prompt_text.strip():
                raise ValueError(f"{where}: field {prompt!r} does not match the first user message")
    if not turns:
        raise ValueError(f"{where}: no messages before the final assistant reply, so no prompt")
    return turns, chosen, rejected, _optional_text(row, subset, where) if subset else None


def _from_pku(row: Row, where: str, preference: str | None) -> _Parsed:
    key = f"{preference or 'better'}_response_id"
    choice = _field(row, key, where)
    # bool is an int subclass; True/False ids mean a mislabelled column, not 1/0.
    if isinstance(choice, bool) or choice not in (0, 1):
        raise ValueError(f"{where}: field {key!r} must be 0 or 1, got {choice!r}")
    responses = (_text(row, "response_0", where), _text(row, "response_1", where))
    return _user(_text(row, "prompt", where)), responses[choice], responses[1 - choice], None


@dataclass(frozen=True)
class _Format:
    fields: frozenset[str]  # what auto-detection needs present and not null
    chosen_is_messages: bool | None  # the type 'chosen' must have for detection (None: no 'chosen')
    convert: Callable[[Row, str, str | None], _Parsed]  # (row, where, preference); only PKU reads preference

    def matches(self, row: Row) -> bool:
        # Columnar files (Parquet, datasets) hold every column in every row, null where unused.
        if any(row.get(name) is None for name in self.fields):
            return False
        return self.chosen_is_messages is None or isinstance(row["chosen"], list) == self.chosen_is_messages


_STRING_PAIR = dict(prompt="prompt", chosen="chosen", rejected="rejected", subset="subset")
_FORMATS: dict[str, _Format] = {
    "pairs": _Format(
        frozenset({"prompt", "chosen", "rejected"}), False, partial(_from_strings, **_STRING_PAIR)
    ),
    "rewardbench": _Format(
        frozenset({"prompt", "chosen", "rejected", "subset"}),
        False,
        partial(_from_strings, **_STRING_PAIR, subset_required=True),
    ),
    "ultrafeedback": _Format(
        frozenset({"prompt", "chosen", "rejected"}), True, partial(_from_messages, prompt="prompt")
    ),
    "skywork": _Format(frozenset({"chosen", "rejected"}), True, partial(_from_messages, subset="source")),
    "pku_saferlhf": _Format(
        frozenset({"prompt", "response_0", "response_1", "better_response_id", "safer_response_id"}),
        None,
        _from_pku,
    ),
    "icliniq": _Format(
        frozenset({"question", "answer_pos", "answer_neg"}),
        None,
        partial(_from_strings, prompt="question", chosen="answer_pos", rejected="answer_neg"),
    ),
}
FORMATS: tuple[str, ...] = tuple(_FORMATS)


def detect_format(row: Row, where: str) -> str:
    """The format whose fields ``row`` has; ``where`` (the row's location) goes into errors.

    When several fit, the one whose fields include all the others' wins (``rewardbench`` over
    ``pairs``, ``ultrafeedback`` over ``skywork``); otherwise the row is ambiguous.
    """
    fits = [name for name, fmt in _FORMATS.items() if fmt.matches(row)]
    best = [a for a in fits if not any(_FORMATS[a].fields < _FORMATS[b].fields for b in fits)]
    if not best:
        raise ValueError(
            f"{where}: unknown format: fields {sorted(row)} fit none of {list(FORMATS)}; pass format="
        )
    if len(best) > 1:
        raise ValueError(f"{where}: ambiguous format: fields {sorted(row)} fit {best}; pass format=")
    return best[0]


def detect_file_format(path: str | Path, *, split: str | None = None) -> str:
    """The format :func:`detect_format` finds in the first row of ``path``."""
    for where, row in iter_rows(path, split=split):
        return detect_format(row, where)
    raise ValueError(f"{path}: no rows to detect the format from")


def render_prompt(turns: Sequence[Mapping[str, str]], tokenizer: ChatTemplateTokenizer | None = None) -> str:
    """Prompt text for ``turns`` (the conversation before the reply).

    With a tokenizer: its chat template with the generation prompt appended. Without: a lone
    user turn is its content; anything else is ``role: content`` lines ending in ``assistant:``
    so the model continues as the assistant.
    """
    turns = [{"role": t["role"], "content": t["content"]} for t in turns]
    if tokenizer is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template to render prompts with")
        return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"


def _check_choice(format: str, preference: str | None, where: str) -> None:
    if format != "auto" and format not in _FORMATS:
        raise ValueError(f"{where}: unknown format {format!r}; expected 'auto' or one of {list(FORMATS)}")
    if preference is not None and preference not in PREFERENCES:
        raise ValueError(f"{where}: unknown preference {preference!r}; expected one of {list(PREFERENCES)}")
    if preference is not None and format not in ("auto", "pku_saferlhf"):
        raise ValueError(f"{where}: preference= applies to format 'pku_saferlhf' only, not {format!r}")


def row_to_pair(
    row: Row,
    where: str,
    format: str,
    *,
    preference: str | None = None,
    tokenizer: ChatTemplateTokenizer | None = None,
) -> PreferencePair:
    """One row of ``format`` (not ``"auto"``) as a PreferencePair; errors name ``where``, its location.

    ``preference`` (``"better"``, the default, or ``"safer"``) applies to ``pku_saferlhf`` only.
    """
    _check_choice(format, preference, where)
    if format == "auto":
        raise ValueError(f"{where}: row_to_pair needs a format name; detect one with detect_format")
    turns, chosen, rejected, subset = _FORMATS[format].convert(row, where, preference)
    if not any(t["content"].strip() for t in turns):
        raise ValueError(f"{where}: the prompt is empty")
    return PreferencePair(render_prompt(turns, tokenizer), chosen, rejected, subset)


def load_pairs(
    path: str | Path,
    *,
    format: str = "auto",
    preference: str | None = None,
    tokenizer: ChatTemplateTokenizer | None = None,
    split: str | None = None,
) -> list[PreferencePair]:
    """Every row of ``path`` (see :func:`iter_rows`) converted by ``format`` (see the module doc).

    ``"auto"`` detects the format from the first row and holds every row to it. Raises
    ``ValueError`` naming the file and row for any bad row.
    """
    _check_choice(format, preference, str(path))
    pairs = []
    for where, row in iter_rows(path, split=split):
        if format == "auto":
            format = detect_format(row, where)
        pairs.append(row_to_pair(row, where, format, preference=preference, tokenizer=tokenizer))
    return pairs


# ---------------------------------------------------------------- train/test split


def _prompt_key(prompt: str) -> str:
    # Prompts that differ only in whitespace are the same question for leakage purposes.
    return " ".join(prompt.split())


def split_pairs(
    pairs: Sequence[PreferencePair], test_fraction: float, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Deterministic (train, test) split that keeps all pairs of a prompt on one side.

    Prompt groups are shuffled by ``seed`` and moved to test until it holds at least
    ``round(test_fraction * len(pairs))`` pairs (at least one group; never the last group, so
    train is never empty). Both sides keep the input order.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(_prompt_key(pair.prompt), []).append(i)
    if len(groups) < 2:
        raise ValueError(f"need at least 2 distinct prompts to split, got {len(groups)}")
    order = list(groups)  # first-appearance order, so the result depends only on data and seed
    random.Random(seed).shuffle(order)
    target = max(1, round(test_fraction * len(pairs)))
    test_rows: set[int] = set()
    for key in order[:-1]:
        if len(test_rows) >= target:
            break
        test_rows.update(groups[key])
    train = [p for i, p in enumerate(pairs) if i not in test_rows]
    test = [p for i, p in enumerate(pairs) if i in test_rows]
    return train, test


def check_disjoint(train: Sequence[PreferencePair], test: Sequence[PreferencePair]) -> None:
    """Raise ``ValueError`` naming a prompt found in both sets (compared up to whitespace)."""
    train_keys = {_prompt_key(p.prompt) for p in train}
    shared = sorted({_prompt_key(p.prompt) for p in test} & train_keys)
    if shared:
        example = shared[0] if len(shared[0]) <= 80 else shared[0][:77] + "..."
        raise ValueError(f"{len(shared)} prompt(s) appear in both train and test, e.g. {example!r}")


def write_pairs_jsonl(pairs: Sequence[PreferencePair], path: str | Path) -> None:
    """Write ``pairs`` as gem_fast JSONL (``subset`` only when set), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for pair in pairs:
            row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
            if pair.subset is not None:
                row["subset"] = pair.subset
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
