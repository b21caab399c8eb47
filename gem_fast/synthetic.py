"""A built-in preference set that a 135M model can learn from in minutes: arithmetic word problems.

Each pair has a worked, correct chain of thought ending in ``Answer: <n>`` as ``chosen`` and a
plausible wrong one as ``rejected`` (an off-by-one slip, the wrong operation, or a wrong carry in
a two-step problem), so the final-answer marker and the reasoning tokens are both exercised.
Generation is deterministic in ``seed``; train and held-out splits never share a prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["ANSWER_MARKER", "arithmetic_pairs", "write_arithmetic_splits"]

ANSWER_MARKER = "Answer:"
_NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ben", "Zoe", "Ravi", "Ida"]
_ITEMS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles"]
_INSTRUCTION = f"Think step by step, then give the final number after '{ANSWER_MARKER}'."


def _worked(steps: str, answer: int) -> str:
    return f"{steps} {ANSWER_MARKER} {answer}"


def _problem(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(2, 40), rng.randint(2, 20), rng.randint(2, 9)
    kind = rng.choice(["add", "sub", "mul", "two_step"])
    if kind == "add":
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        right = _worked(f"{name} starts with {a} {item} and gets {b} more, so {a} + {b} = {a + b}.", a + b)
        wrong_value = a + b + rng.choice([-1, 1])
        wrong = _worked(f"{name} starts with {a} {item} and gets {b} more, so {a} + {b} = {wrong_value}.", wrong_value)
    elif kind == "sub":
        a = a + b  # keep the difference positive
        question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        right = _worked(f"{name} starts with {a} {item} and gives away {b}, so {a} - {b} = {a - b}.", a - b)
        wrong = _worked(f"{name} starts with {a} {item} and gives away {b}, so {a} + {b} = {a + b}.", a + b)
    elif kind == "mul":
        question = f"{name} buys {c} boxes with {b} {item} in each box. How many {item} is that?"
        right = _worked(f"There are {c} boxes of {b} {item}, so {c} x {b} = {c * b}.", c * b)
        wrong = _worked(f"There are {c} boxes of {b} {item}, so {c} + {b} = {c + b}.", c + b)
    else:
        question = (
            f"{name} has {a} {item}, gets {b} more, then gives away {c}. How many {item} are left?"
        )
        first = a + b
        right = _worked(f"First {a} + {b} = {first}. Then {first} - {c} = {first - c}.", first - c)
        slip = first + rng.choice([-1, 1])
        wrong = _worked(f"First {a} + {b} = {slip}. Then {slip} - {c} = {slip - c}.", slip - c)
    return {"prompt": f"{question} {_INSTRUCTION}", "chosen": right, "rejected": wrong, "subset": kind}


def arithmetic_pairs(n: int, *, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct preference rows ``{"prompt", "chosen", "rejected", "subset"}``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    rows: dict[str, dict[str, str]] = {}
    while len(rows) < n:
        row = _problem(rng)
        rows.setdefault(row["prompt"], row)
    return list(rows.values())


def write_arithmetic_splits(
    out_dir: str | Path, *, n_train: int = 256, n_test: int = 128, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` under ``out_dir`` (disjoint prompts)."""
    rows = arithmetic_pairs(n_train + n_test, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.jsonl", out_dir / "test.jsonl"
    for path, part in zip(paths, (rows[:n_train], rows[n_train:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return paths
