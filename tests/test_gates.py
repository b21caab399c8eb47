"""The gates of :mod:`gem_fast.gates`: rank correlation by hand, teacher-forced Eq. 1 scores against a float64
reference, the candidate gates' bookkeeping, greedy completions against Hugging Face generate."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import pytest
import torch
from tiny_lm import tiny_model

from gem_fast.calibration import NO_SIGNAL, Setting, calibrate, default_grid, pair_entropies, setting_correct
from gem_fast.config import SamplingConfig, SegaConfig
from gem_fast.data import PreferencePair, encode_pairs
from gem_fast.data.synthetic import final_answer
from gem_fast.flags import parse_config
from gem_fast.gates import candidate_gates, greedy_completions, greedy_task_accuracy, pair_scores, spearman
from gem_fast.logprobs import pair_logprobs
from gem_fast.scoring import entropy_score, final_mask_last_fraction

PAIRS = [PreferencePair(f"Is {i} x 3 more than {3 * i - 1}?", f"{i} x 3 = {3 * i}, so yes. Answer: yes",
                        f"{i} x 3 = {3 * i - 2}, so no. Answer: no") for i in range(2, 7)]


def test_spearman_by_hand():
    # Ranks of y (ties shared): [1.5, 1.5, 3.5, 3.5]; Pearson with [1, 2, 3, 4] is 2 / sqrt(5).
    assert spearman(torch.tensor([0.1, 0.5, 0.7, 2.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])) == pytest.approx(
        2 / math.sqrt(5))
    assert spearman(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])))


def test_pair_scores_match_a_float64_reference(tok):
    model = tiny_model(tok).double()
    sega = SegaConfig(final_span="last_fraction", final_fraction=0.3)
    eq1, logp = pair_scores(model.float(), tok, PAIRS, sega, chat_template=False, batch_size=2, backend="torch")
    batch = encode_pairs(tok, PAIRS)
    with torch.no_grad():
        logits = model.double()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    log_probs = logits.log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    valid = batch.response_mask[:, 1:]
    reference = entropy_score(entropy, final_mask_last_fraction(valid, 0.3), valid, lambda_fork=0.4, top_m=0.1)
    n = len(PAIRS)
    torch.testing.assert_close(eq1, reference.view(2, n).T.float(), rtol=1e-4, atol=1e-4)
    expected = pair_logprobs(model.float(), tok, PAIRS, backend="torch")
    torch.testing.assert_close(logp, torch.stack([expected.chosen, expected.rejected], -1), rtol=1e-5, atol=1e-4)


def test_candidate_gates_count_what_they_report(tok):
    model = tiny_model(tok)
    sampling = SamplingConfig(k=3, gen_max_new_tokens=5)
    sega = SegaConfig(final_span="marker")
    answered = [dataclasses.replace(p, answer="yes") for p in PAIRS]
    gates = candidate_gates(model, tok, answered, sampling, sega, chat_template=False, batch_size=2, backend="torch")
    eq1, logp = pair_scores(model, tok, PAIRS, sega, chat_template=False, backend="torch")
    assert gates.eq1_pair_accuracy == pytest.approx(float((eq1[:, 0] > eq1[:, 1]).double().mean()))
    assert gates.logp_pair_accuracy == pytest.approx(float((logp[:, 0] > logp[:, 1]).double().mean()))
    assert (gates.pairs, gates.candidates) == (5, 15)
    # A random tiny model stops within 5 tokens only if it draws EOS; it never writes "Answer: yes".
    assert gates.correct_share == 0.0 and gates.informative_groups == 0 and math.isnan(gates.rank_correlation)
    assert 0.5 < gates.truncated_share <= 1.0
    unchecked = candidate_gates(model, tok, PAIRS, sampling, sega, chat_template=False, batch_size=2, backend="torch")
    assert math.isnan(unchecked.correct_share) and "not measured" in unchecked.lines()[1]
    assert unchecked.truncated_share == gates.truncated_share  # the same seed draws the same candidates


def test_greedy_completions_are_hf_generates_and_accuracy_reads_their_answers(tok):
    model = tiny_model(tok, seed=3)
    prompts = [p.prompt for p in PAIRS[:3]]
    expected = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        expected.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    texts = greedy_completions(model, tok, prompts, max_new_tokens=6, chat_template=False, batch_size=2)
    assert texts == expected
    # A random tiny model states no answer: nothing counts, whatever the references say.
    assert [final_answer(t) for t in texts] == [None] * 3
    assert greedy_task_accuracy(model, tok, prompts, ["yes", "no", "yes"], max_new_tokens=6, chat_template=False) == 0


def test_gates_script_prints_and_writes_the_gates(tok, tmp_path, capsys):
    from gem_fast.cli import gates as script

    model_dir = tmp_path / "model"
    tiny_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({**vars(p), "answer": "yes"}) + "\n" for p in PAIRS))
    out = tmp_path / "gates.json"
    argv = ["--model_name_or_path", str(model_dir), "--train_jsonl", str(data), "--k", "2",
            "--gen_max_new_tokens", "3", "--kernel_backend", "torch"]
    assert script.main([*argv, "--output_json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gate 1, Eq. 1 preference accuracy on 5 labelled pairs" in printed and "gate 3" in printed
    written = json.loads(out.read_text())
    assert written["candidates"] == 10 and written["k"] == 2 and written["length_p90"] <= 3
    data.write_text("")
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    assert stop.value.code == 2 and "no rows" in capsys.readouterr().err


def test_calibration_cross_validates_the_choice_and_says_when_nothing_beats_chance():
    grid = default_grid()[:3]
    always = torch.stack([torch.zeros(8, dtype=torch.bool), torch.ones(8, dtype=torch.bool),
                          torch.zeros(8, dtype=torch.bool)])
    result = calibrate(always, grid, folds=4)
    assert result.chosen == grid[1] and result.cv_accuracy == 1.0 and result.beats_chance
    assert not any(NO_SIGNAL in line for line in result.lines())
    assert [r.accuracy for r in result.results] == [0.0, 1.0, 0.0]
    # Each setting right on a different half: the best on the training folds is wrong on the held-out fold.
    half = torch.tensor([[True] * 4 + [False] * 4, [False] * 4 + [True] * 4, [False] * 8])
    result = calibrate(half, grid, folds=2, seed=3)
    assert result.results[0].accuracy == 0.5 and not result.beats_chance
    assert result.lines()[-1] == f"{NO_SIGNAL}: no setting's cross-validated pair accuracy beats chance"
    with pytest.raises(ValueError, match="folds"):
        calibrate(half, grid, folds=9)


def test_calibration_scores_the_default_setting_as_gate_1_does(tok):
    model = tiny_model(tok)
    default = default_grid()[0]
    eq1, _ = pair_scores(model, tok, PAIRS, default.sega(), chat_template=False, backend="torch")
    tokens = pair_entropies(model, tok, PAIRS, chat_template=False, batch_size=2, backend="torch")
    assert torch.equal(setting_correct(tokens, default, tok), eq1[:, 0] > eq1[:, 1])
    ranked = dataclasses.replace(default, ranking="bradley_terry", final_span="last_fraction")
    assert setting_correct(tokens, ranked, tok).shape == (len(PAIRS),)


def test_calibration_never_reads_the_evaluation_file_and_its_yaml_configures_sega(tok, tmp_path, capsys,
                                                                                   monkeypatch):
    from gem_fast.cli import gates as script

    model_dir = tmp_path / "model"
    tiny_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(vars(p)) + "\n" for p in PAIRS))
    missing_eval = tmp_path / "heldout.jsonl"  # never written: reading it would fail
    opened = []
    real_open = pathlib.Path.open
    monkeypatch.setattr(pathlib.Path, "open", lambda self, *a, **k: opened.append(self.resolve()) or
                        real_open(self, *a, **k))
    out_yaml = tmp_path / "eq1.yaml"
    assert script.main(["--calibrate", "--model_name_or_path", str(model_dir), "--train_jsonl", str(data),
                        "--folds", "5", "--kernel_backend", "torch", "--output_yaml", str(out_yaml)]) == 0
    assert missing_eval.resolve() not in opened and data.resolve() in opened
    printed = capsys.readouterr().out
    assert f"cross-validated (5 folds of {len(PAIRS)} labelled pairs" in printed
    assert printed.count("% (95% CI") == len(default_grid()) + 1
    cfg = parse_config(["--config", str(out_yaml)], objective="sega", description="")
    chosen = {k: getattr(cfg.sega, k) for k in ("lambda_fork", "top_m", "final_span", "final_fraction", "ranking")}
    assert f"chosen (best on all labelled pairs): {Setting(**chosen).label()}" in printed
    with pytest.raises(SystemExit) as stop:
        script.main(["--calibrate", "--train_jsonl", str(data), "--folds", "6"])
    assert stop.value.code == 2 and "--folds 6: more folds than the 5 labelled rows" in capsys.readouterr().err
