"""Preference accuracy: ties, bootstrap interval, subsets, a model with a known answer, the script."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_lm import tiny_model

from gem_fast.data import PreferencePair
from gem_fast.eval import (
    accuracy_report,
    accuracy_stats,
    bootstrap_ci,
    evaluate_preference_accuracy,
    format_table,
    implicit_rewards,
    paired_bootstrap_ci,
)
from gem_fast.logprobs import PairLogprobs


# Under a uniform next-token distribution log π(a|q) = -(len(a) + 1) log V (one token per
# character, plus EOS): the shorter response wins, equal lengths tie.
PAIRS = [
    PreferencePair("Q: 2+2?", "4", "four", "short"),  # chosen shorter: correct
    PreferencePair("Name a colour", "red", "a deep blue", "short"),  # correct
    PreferencePair("Say hi", "hello there", "hi", "long"),  # chosen longer: wrong
    PreferencePair("Pick", "ab", "cd", "tie"),  # same length: a tie, wrong
]


@pytest.fixture(scope="module")
def uniform_model(tok):
    model = tiny_model(tok)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit is 0
    return model


def test_ties_are_not_correct():
    chosen, rejected = torch.tensor([1.0, 2.0, 3.0, 1000.0]), torch.tensor([0.0, 2.0, 4.0, 1000.0 - 1e-4])
    stats = accuracy_stats(chosen, rejected, n_resamples=10)
    # 1000 vs 1000 - 1e-4 differs by 1e-7 relative: rounding noise, a tie.
    assert stats.accuracy == pytest.approx(1 / 4)
    assert stats.ties == 2 and stats.n == 4
    exact = accuracy_stats(chosen, rejected, tie_tolerance=0.0, n_resamples=10)
    assert exact.accuracy == pytest.approx(2 / 4) and exact.ties == 1


def test_bootstrap_interval_is_seeded_and_sensible():
    half = torch.arange(200) % 2 == 0
    lo, hi = bootstrap_ci(half, seed=3)
    assert (lo, hi) == bootstrap_ci(half, seed=3)
    # Binomial standard error sqrt(0.25 / 200) = 0.035: the 95 % interval is about 0.5 ± 0.07.
    assert 0.41 < lo < 0.46 and 0.54 < hi < 0.59
    assert bootstrap_ci(torch.ones(7, dtype=torch.bool)) == (1.0, 1.0)
    with pytest.raises(ValueError, match="correct"):
        bootstrap_ci(torch.zeros(0, dtype=torch.bool))


def test_paired_bootstrap_of_an_accuracy_difference():
    a = [True] * 60 + [False] * 40
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0, 0.0)  # what both get right or wrong cancels
    b = [False] * 10 + a[10:]  # A right on 10 more of the same 100 pairs
    diff, lo, hi = paired_bootstrap_ci(a, b, seed=1)
    # Per-pair differences are 10 ones and 90 zeros: mean 0.1, standard error 0.03.
    assert diff == pytest.approx(0.1) and 0.03 < lo < 0.07 and 0.14 < hi < 0.17
    with pytest.raises(ValueError, match="100 and 99"):
        paired_bootstrap_ci(a, b[:99])


def test_implicit_rewards_with_and_without_reference():
    policy = PairLogprobs(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([2]), torch.tensor([3]))
    reference = PairLogprobs(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([2]), torch.tensor([3]))
    assert [t.item() for t in implicit_rewards(policy, beta=0.5)] == [-2.0, -3.0]
    assert [t.item() for t in implicit_rewards(policy, reference, beta=0.5)] == [-1.5, -0.5]
    normalized = implicit_rewards(policy, reference, beta=2.0, length_normalize=True)
    assert [t.item() for t in normalized] == pytest.approx([2 * (-2.0 + 0.5), 2 * (-2.0 + 5 / 3)])
    with pytest.raises(ValueError, match="beta"):
        implicit_rewards(policy, beta=-1.0)


def test_report_per_subset():
    report = accuracy_report(
        torch.tensor([1.0, 1.0, 0.0, 5.0]), torch.tensor([0.0, 2.0, 1.0, 1.0]), ["a", "a", "b", None], n_resamples=50
    )
    assert report.overall.accuracy == 0.5
    assert {k: v.accuracy for k, v in report.per_subset.items()} == {"a": 0.5, "b": 0.0}
    assert report.margins == [1.0, -1.0, -1.0, 4.0]


def test_uniform_model_gives_the_known_answer(uniform_model, tok):
    report = evaluate_preference_accuracy(uniform_model, tok, PAIRS, beta=0.5, batch_size=3, backend="torch")
    log_v = math.log(len(tok))
    expected = [0.5 * (len(p.rejected) - len(p.chosen)) * log_v for p in PAIRS]
    assert report.margins == pytest.approx(expected, abs=1e-4)
    assert report.overall.accuracy == 0.5 and report.overall.ties == 1
    assert report.correct == [True, True, False, False]
    assert {k: v.accuracy for k, v in report.per_subset.items()} == {"long": 0.0, "short": 1.0, "tie": 0.0}
    # Per-token means are all -log V: every pair ties, nothing is correct.
    normalized = evaluate_preference_accuracy(uniform_model, tok, PAIRS, length_normalize=True, backend="torch")
    assert normalized.overall.accuracy == 0.0 and normalized.overall.ties == len(PAIRS)
    # Against itself as the reference every implicit reward is 0.
    against_self = evaluate_preference_accuracy(uniform_model, tok, PAIRS, ref_model=uniform_model, backend="torch")
    assert against_self.overall.ties == len(PAIRS)
    table = format_table(report)
    assert "short" in table and " 50.0%" in table and "ties count as wrong" in table


def test_script_prints_a_table_and_writes_json(uniform_model, tok, tmp_path, capsys):
    model_dir = tmp_path / "model"
    uniform_model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "subset": p.subset} for p in PAIRS]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "report.json"
    from gem_fast.cli import eval_pref_accuracy as script

    argv = ["--model_name_or_path", str(model_dir), "--eval_jsonl", str(data), "--beta", "1.0"]
    assert script.main([*argv, "--n_bootstrap", "100", "--output_json", str(out), "--backend", "torch"]) == 0
    printed = capsys.readouterr().out
    assert "all" in printed and "50.0%" in printed and str(out) in printed
    report = json.loads(out.read_text())
    assert report["overall"]["accuracy"] == 0.5 and report["overall"]["n"] == 4
    assert report["per_subset"]["short"]["accuracy"] == 1.0
    assert report["beta"] == 1.0 and report["eval_jsonl"] == str(data)
    assert report["correct"] == [True, True, False, False] and "task_accuracy" not in report


def test_script_adds_the_greedy_task_accuracy_of_rows_with_answers(uniform_model, tok, tmp_path, capsys):
    from gem_fast.cli import eval_pref_accuracy as script

    model_dir = tmp_path / "model"
    uniform_model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                        "answer": "4"}) + "\n" for p in PAIRS))
    out = tmp_path / "report.json"
    argv = ["--model_name_or_path", str(model_dir), "--eval_jsonl", str(data), "--n_bootstrap", "10",
            "--backend", "torch", "--task_max_new_tokens", "4"]
    assert script.main([*argv, "--output_json", str(out)]) == 0
    # All-zero logits: greedy decoding repeats token 0 (padding), which states no answer.
    assert json.loads(out.read_text())["task_accuracy"] == 0.0
    assert "task accuracy (greedy, 4 tokens at most): 0.0%" in capsys.readouterr().out
    data.write_text(data.read_text() + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(SystemExit) as stop:
        script.main([*argv, "--output_json", str(tmp_path / "other.json")])
    assert stop.value.code == 2 and "1 rows of" in capsys.readouterr().err


def test_progress_bars_name_what_is_scored(uniform_model, tok, capsys):
    evaluate_preference_accuracy(uniform_model, tok, PAIRS, ref_model=uniform_model, batch_size=3, backend="torch",
                                 progress=True)
    err = capsys.readouterr().err
    assert "eval: model log-probs" in err and "eval: reference log-probs" in err and "4/4" in err
    evaluate_preference_accuracy(uniform_model, tok, PAIRS, backend="torch", progress=False)
    assert "log-probs" not in capsys.readouterr().err
