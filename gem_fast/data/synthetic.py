"""Built-in preference sets that a 135M model can learn from in minutes: ``arith`` and ``decision``.

``arith``: arithmetic word problems. ``chosen`` is a worked, correct chain ending in
``Answer: <n>``; ``rejected`` a plausible wrong one (an off-by-one slip, the wrong operation, or
a wrong carry in a two-step problem). The final number is copied from the chain, so the
final-answer tokens carry little signal of their own.

``decision``: the final answer is a decision the reasoning determines: which of two products or
sums is larger (``Answer: A`` / ``Answer: B``), or whether a product exceeds a threshold
(``Answer: yes`` / ``Answer: no``). ``chosen`` and ``rejected`` share the chain except one
computation step, whose slipped tens digit flips the comparison and with it the decision; the
two values are within 10, so the decision is not guessable from the operands' size.

Every row is ``{"prompt", "chosen", "rejected", "subset", "answer"}``, ``answer`` being what a
correct response writes after ``Answer:`` (:func:`final_answer` reads it back from a response).
Generation is deterministic in ``seed``; train and held-out splits never share a prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Literal

__all__ = ["ANSWER_MARKER", "TASKS", "task_pairs", "final_answer", "write_task_splits"]

ANSWER_MARKER = "Answer:"
TASKS = ("arith", "decision")
Task = Literal["arith", "decision"]
Row = dict[str, str]

_NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ben", "Zoe", "Ravi", "Ida"]
_ITEMS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles"]
_ARITH_INSTRUCTION = f"Think step by step, then give the final number after '{ANSWER_MARKER}'."


def _worked(steps: str, answer: int | str) -> str:
    return f"{steps} {ANSWER_MARKER} {answer}"


def _arith_problem(rng: random.Random) -> Row:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(2, 40), rng.randint(2, 20), rng.randint(2, 9)
    kind = rng.choice(["add", "sub", "mul", "two_step"])
    if kind == "add":
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        answer = a + b
        right = _worked(f"{name} starts with {a} {item} and gets {b} more, so {a} + {b} = {answer}.", answer)
        wrong_value = a + b + rng.choice([-1, 1])
        wrong = _worked(f"{name} starts with {a} {item} and gets {b} more, so {a} + {b} = {wrong_value}.", wrong_value)
    elif kind == "sub":
        a = a + b  # keep the difference positive
        question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        answer = a - b
        right = _worked(f"{name} starts with {a} {item} and gives away {b}, so {a} - {b} = {answer}.", answer)
        wrong = _worked(f"{name} starts with {a} {item} and gives away {b}, so {a} + {b} = {a + b}.", a + b)
    elif kind == "mul":
        question = f"{name} buys {c} boxes with {b} {item} in each box. How many {item} is that?"
        answer = c * b
        right = _worked(f"There are {c} boxes of {b} {item}, so {c} x {b} = {answer}.", answer)
        wrong = _worked(f"There are {c} boxes of {b} {item}, so {c} + {b} = {c + b}.", c + b)
    else:
        question = f"{name} has {a} {item}, gets {b} more, then gives away {c}. How many {item} are left?"
        first = a + b
        answer = first - c
        right = _worked(f"First {a} + {b} = {first}. Then {first} - {c} = {answer}.", answer)
        slip = first + rng.choice([-1, 1])
        wrong = _worked(f"First {a} + {b} = {slip}. Then {slip} - {c} = {slip - c}.", slip - c)
    return {"prompt": f"{question} {_ARITH_INSTRUCTION}", "chosen": right, "rejected": wrong, "subset": kind,
            "answer": str(answer)}


def _slipped(value: int, other: int) -> int:
    """``value`` with its tens digit off by one, towards and past ``other`` (|value - other| < 10)."""
    return value + 10 if value < other else value - 10


def _close_expressions(rng: random.Random, kind: str) -> tuple[list[str], list[int]]:
    """Two expressions of ``kind`` whose values differ by 1-9: 2-digit sums or 2-digit x 1-digit products.

    Sized so that SmolLM2-135M's log-probs spot the slip a little more often than chance (64 pairs
    each: 55 % and 61 %; 3-digit sums 48 %, products of factors 3-12 89 %).
    """
    while True:
        if kind == "sums":
            terms = [(rng.randint(12, 60), rng.randint(12, 60)) for _ in range(2)]
            values, op = [a + b for a, b in terms], "+"
        else:
            terms = [(rng.randint(12, 49), rng.randint(3, 9)) for _ in range(2)]
            values, op = [a * b for a, b in terms], "x"
        if 0 < abs(values[0] - values[1]) < 10:
            return [f"{a} {op} {b}" for a, b in terms], values


def _compare_problem(rng: random.Random) -> Row:
    """Which of two close expressions is larger; one slipped step flips the decision."""
    kind = rng.choice(["products", "sums"])
    texts, values = _close_expressions(rng, kind)
    slip_side = rng.randrange(2)
    wrong_values = list(values)
    wrong_values[slip_side] = _slipped(values[slip_side], values[1 - slip_side])

    def chain(v: list[int]) -> str:
        larger = "A" if v[0] > v[1] else "B"
        sign = ">" if v[0] > v[1] else "<"
        return _worked(f"A = {texts[0]} = {v[0]}. B = {texts[1]} = {v[1]}. {v[0]} {sign} {v[1]}, so {larger} is "
                       f"larger.", larger)

    question = (f"Which is larger, A = {texts[0]} or B = {texts[1]}? Work out both, then give "
                f"'{ANSWER_MARKER} A' or '{ANSWER_MARKER} B'.")
    return {"prompt": question, "chosen": chain(values), "rejected": chain(wrong_values), "subset": kind,
            "answer": "A" if values[0] > values[1] else "B"}


def _threshold_problem(rng: random.Random) -> Row:
    """Whether a product of two factors 3-12 exceeds a close threshold; the slipped product lands on the other side."""
    a, b = rng.randint(3, 12), rng.randint(3, 12)
    while a * b < 20:  # so that a slip down by 10 stays positive
        a, b = rng.randint(3, 12), rng.randint(3, 12)
    value = a * b
    threshold = value + rng.choice([-1, 1]) * rng.randint(1, 9)

    def chain(v: int) -> str:
        verdict = "yes" if v > threshold else "no"
        relation = "more than" if v > threshold else "not more than"
        return _worked(f"{a} x {b} = {v}, which is {relation} {threshold}, so {verdict}.", verdict)

    question = (f"Is {a} x {b} more than {threshold}? Work it out, then give "
                f"'{ANSWER_MARKER} yes' or '{ANSWER_MARKER} no'.")
    return {"prompt": question, "chosen": chain(value), "rejected": chain(_slipped(value, threshold)),
            "subset": "threshold", "answer": "yes" if value > threshold else "no"}


def _decision_problem(rng: random.Random) -> Row:
    return _compare_problem(rng) if rng.random() < 2 / 3 else _threshold_problem(rng)


_PROBLEMS: dict[str, Callable[[random.Random], Row]] = {"arith": _arith_problem, "decision": _decision_problem}


def task_pairs(task: Task, n: int, *, seed: int = 0) -> list[Row]:
    """``n`` preference rows of ``task`` with distinct prompts (see the module docstring for the fields)."""
    if task not in _PROBLEMS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    rows: dict[str, Row] = {}
    while len(rows) < n:
        row = _PROBLEMS[task](rng)
        rows.setdefault(row["prompt"], row)
    return list(rows.values())


def final_answer(response: str) -> str | None:
    """What ``response`` states after its last ``Answer:``: the first word, without trailing punctuation;
    None when there is no marker or nothing after it."""
    if ANSWER_MARKER not in response:
        return None
    words = response.rsplit(ANSWER_MARKER, 1)[1].split()
    return words[0].rstrip(".,;:!") if words else None


def write_task_splits(
    out_dir: str | Path, *, task: Task = "arith", n_train: int = 256, n_test: int = 128, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` of ``task`` under ``out_dir`` (disjoint prompts)."""
    rows = task_pairs(task, n_train + n_test, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.jsonl", out_dir / "test.jsonl"
    for path, part in zip(paths, (rows[:n_train], rows[n_train:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return paths
