"""SEGA's rating step: Eq. 1 scores by default, or Bradley-Terry / TrueSkill ratings of the token comparisons;
a training step with each; the shuffled-advantage control."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_lm import run_config, tiny_model, write_run_inputs

from gem_fast.config import TrainConfig
from gem_fast.distributed import DistEnv
from gem_fast.objectives import SEGA
from gem_fast.objectives.sega import Groups
from gem_fast.policy import PolicyLoss
from gem_fast.advantages import sega_advantages
from gem_fast.train import train


def _sample() -> Groups:
    """One prompt, k = 3 candidates of 8 tokens: 0 answers confidently, 2 hesitantly, 1 generates nothing."""
    entropy = torch.tensor([[1.0, 2.0, 0.5, 1.5, 0.1, 0.1],
                            [0.0] * 6,
                            [1.0, 2.0, 0.5, 1.5, 2.0, 2.5]])
    mask = torch.tensor([[True] * 6, [False] * 6, [True] * 6])
    return Groups(torch.zeros(3, 6, dtype=torch.long), entropy, mask, torch.tensor([3]), (False,))


def _sega(ranking: str) -> SEGA:
    cfg = TrainConfig.from_flat({"objective": "sega", "k": 3, "ranking": ranking, "final_fraction": 0.34})
    return SEGA(cfg, DistEnv.single(), [], tokenizer=None)


def test_score_ranking_passes_eq1_scores_through():
    scores, ratings = _sega("score").rate(_sample())
    assert ratings is scores and scores.shape == (1, 3)
    assert scores[0, 1] == -math.inf and scores[0, 0] > scores[0, 2]


@pytest.mark.parametrize("ranking", ["bradley_terry", "trueskill"])
def test_fitted_rankings_order_like_the_tokens_and_keep_no_answer_at_minus_inf(ranking):
    scores, ratings = _sega(ranking).rate(_sample())
    assert ratings.shape == scores.shape and not torch.equal(ratings, scores)
    assert ratings[0, 1] == -math.inf  # no answer tokens: the reward mapping gives it 0
    assert math.isfinite(ratings[0, 0]) and ratings[0, 0] > ratings[0, 2]
    adv = sega_advantages(ratings, mapping="softmax")
    assert adv[0, 0] > 0 > adv[0, 2]


@pytest.mark.parametrize("ranking", ["score", "trueskill"])
def test_sega_trains_with_each_ranking(tmp_path, ranking):
    model_dir, data = write_run_inputs(tmp_path, n_pairs=4)
    cfg = run_config(model_dir, data, tmp_path / "out", objective="sega", ranking=ranking, k=3, gen_max_new_tokens=5,
                     batch_size=2, max_steps=1, export_hf=False)
    records = []
    result = train(cfg, on_step=lambda step, record, policy: records.append(record))
    assert result.steps_done == 1 and math.isfinite(result.losses[0])
    assert records[0]["adv_abs_mean"] > 0 and records[0]["gen_len_mean"] > 0


def test_shuffled_control_permutes_each_groups_advantages_and_samples_the_same(tok):
    prompts = [f"Q{i}: {i}+{i}=" for i in range(4)]
    policy = PolicyLoss(tiny_model(tok))
    steps = {}
    for shuffle in (False, True):
        cfg = TrainConfig.from_flat({"objective": "sega", "k": 4, "batch_size": 2, "gen_max_new_tokens": 6,
                                     "reward_mapping": "identity", "shuffle_advantages": shuffle})
        (mb,), _ = SEGA(cfg, DistEnv.single(), prompts, tok).step_batches(policy, step=0)
        steps[shuffle] = mb
    plain, shuffled = steps[False], steps[True]
    assert torch.equal(plain.batch.input_ids, shuffled.batch.input_ids)  # the same candidates were drawn
    adv_plain, adv_shuffled = (m.token_weights[:, 0].view(2, 4) for m in (plain, shuffled))
    assert torch.equal(adv_plain.sort(-1).values, adv_shuffled.sort(-1).values)
    assert not torch.equal(adv_plain, adv_shuffled)


@pytest.mark.parametrize("fallback", [True, False])
def test_a_candidate_cut_off_before_its_marker_is_scored_on_its_last_tokens(tok, fallback):
    texts = ["1+1=2. Answer: 2", "1+1 is 2, becaus"]  # the second ran out of tokens before "Answer:"
    ids = torch.tensor([tok(t)["input_ids"] for t in texts])
    entropy = torch.linspace(0.1, 2.0, ids.numel()).view(ids.shape)
    sample = Groups(ids, entropy, torch.ones_like(ids, dtype=torch.bool), torch.tensor([2]), (False,))
    cfg = TrainConfig.from_flat({"objective": "sega", "k": 2, "final_span": "marker", "marker_fallback": fallback})
    scores, _ = SEGA(cfg, DistEnv.single(), [], tok).rate(sample)
    assert math.isfinite(scores[0, 0])
    assert math.isfinite(scores[0, 1]) == fallback


def test_sega_trains_on_prompt_only_rows_and_names_a_bad_one(tmp_path):
    model_dir, _ = write_run_inputs(tmp_path, n_pairs=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Q{i}: {i}+{i}=", "id": i}) + "\n" for i in range(4)))
    cfg = run_config(model_dir, prompts, tmp_path / "out", objective="sega", k=2, gen_max_new_tokens=4,
                     batch_size=2, max_steps=2, export_hf=False)
    assert train(cfg).steps_done == 2
    prompts.write_text('{"prompt": "fine"}\n{"chosen": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: missing field 'prompt'"):
        train(cfg.replace(out_dir=str(tmp_path / "out2")))
