import json
import re

import pytest

from gem_fast.data.synthetic import ANSWER_MARKER, TASKS, final_answer, task_pairs, write_task_splits


def _equations_hold(chain: str) -> bool:
    """Every ``<a> op <b> = <n>`` in the chain (the part before the marker) is arithmetic truth."""
    steps = chain.split(ANSWER_MARKER)[0]
    found = re.findall(r"(\d+) ([-+x]) (\d+) = (\d+)", steps)
    assert found, chain
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}
    return all(ops[op](int(a), int(b)) == int(n) for a, op, b, n in found)


@pytest.mark.parametrize("task", TASKS)
def test_pairs_are_deterministic_distinct_and_correct(task):
    rows = task_pairs(task, 200, seed=3)
    assert rows == task_pairs(task, 200, seed=3)
    assert rows != task_pairs(task, 200, seed=4)
    assert len({r["prompt"] for r in rows}) == 200
    for row in rows:
        assert _equations_hold(row["chosen"]), row
        assert final_answer(row["chosen"]) == row["answer"] != final_answer(row["rejected"])


def test_decision_pairs_differ_in_one_step_and_in_the_decision():
    rows = task_pairs("decision", 300, seed=0)
    assert {r["subset"] for r in rows} == {"products", "sums", "threshold"}
    answers = [r["answer"] for r in rows]
    for label in ("A", "B", "yes", "no"):  # no decision dominates, so guessing is ~50 %
        assert 0.1 < answers.count(label) / len(rows) < 0.6
    for row in rows:
        assert not _equations_hold(row["rejected"]), row  # the rejected chain's one step is wrong
        chosen, rejected = (re.findall(r"= (\d+)", row[k]) for k in ("chosen", "rejected"))
        assert sum(a != b for a, b in zip(chosen, rejected)) == 1, row


def test_final_answer_reads_the_last_marker():
    assert final_answer("A = 3. Answer: B.") == "B"
    assert final_answer("Answer: 4, no wait. Answer: 5") == "5"
    assert final_answer("no marker") is None and final_answer("cut off. Answer:") is None


@pytest.mark.parametrize("task", TASKS)
def test_splits_share_no_prompt(tmp_path, task):
    train, test = write_task_splits(tmp_path, task=task, n_train=50, n_test=20, seed=1)
    train_rows = [json.loads(line) for line in train.read_text().splitlines()]
    test_rows = [json.loads(line) for line in test.read_text().splitlines()]
    assert (len(train_rows), len(test_rows)) == (50, 20)
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in test_rows}
