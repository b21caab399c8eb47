import json

from gem_fast.synthetic import ANSWER_MARKER, arithmetic_pairs, write_arithmetic_splits


def _final_number(text: str) -> int:
    return int(text.rsplit(ANSWER_MARKER, 1)[1])


def test_pairs_are_deterministic_distinct_and_correct():
    rows = arithmetic_pairs(200, seed=3)
    assert rows == arithmetic_pairs(200, seed=3)
    assert rows != arithmetic_pairs(200, seed=4)
    assert len({r["prompt"] for r in rows}) == 200
    for row in rows:
        # The chosen chain's equations hold and its answer differs from the rejected one's.
        steps = row["chosen"].split(ANSWER_MARKER)[0]
        for eq in [s for s in steps.replace(",", ".").split(".") if "=" in s]:
            lhs, rhs = eq.rsplit("=", 1)
            expr = lhs.split("so")[-1].split("First")[-1].split("Then")[-1].replace("x", "*")
            assert eval(expr) == int(rhs), row["chosen"]
        assert _final_number(row["chosen"]) != _final_number(row["rejected"])
    assert {r["subset"] for r in rows} == {"add", "sub", "mul", "two_step"}


def test_splits_share_no_prompt(tmp_path):
    train, test = write_arithmetic_splits(tmp_path, n_train=50, n_test=20, seed=1)
    train_rows = [json.loads(line) for line in train.read_text().splitlines()]
    test_rows = [json.loads(line) for line in test.read_text().splitlines()]
    assert (len(train_rows), len(test_rows)) == (50, 20)
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in test_rows}
