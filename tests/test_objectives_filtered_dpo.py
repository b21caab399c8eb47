"""GEM's cognitive filtering: human-anchored groups, trimming, and DPO on the top/bottom-ranked members."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_lm import run_config, tiny_model, write_run_inputs

from gem_fast.advantages import sega_advantages
from gem_fast.config import TrainConfig
from gem_fast.data import PreferencePair
from gem_fast.distributed import DistEnv
from gem_fast.errors import UsageError
from gem_fast.objectives import SEGA
from gem_fast.objectives.sega import Groups
from gem_fast.objectives.filtered_dpo import top_bottom_members
from gem_fast.policy import PolicyLoss
from gem_fast.ranking import anchor_human_pair, bradley_terry, trueskill
from gem_fast.train import train


def _bisect(f, lo: float, hi: float) -> float:
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def test_anchored_bradley_terry_by_hand_on_three_candidates():
    # Three candidates whose entropy comparisons all tie; the human says 0 beats 1.
    wins = torch.full((1, 3, 3), 0.5).masked_fill(torch.eye(3, dtype=torch.bool), 0.0).double()
    chosen, rejected = torch.tensor([0]), torch.tensor([1])
    assert torch.equal(bradley_terry(anchor_human_pair(wins, chosen, rejected, 0.0)), bradley_terry(wins))
    assert bradley_terry(wins).abs().max() < 1e-9  # today's result: no preference
    weight, prior = 1.0, 0.1  # bradley_terry's default prior: pseudo-wins on every ordered pair
    theta = bradley_terry(anchor_human_pair(wins, chosen, rejected, weight))[0]
    # By symmetry theta = (a, -a, 0); candidate 0's likelihood equation: its wins equal its expected wins.
    w, w01 = 0.5 + prior, 0.5 + prior + weight
    a = _bisect(lambda a: (w01 + w) * torch.sigmoid(torch.tensor(2 * a)).item()
                + 2 * w * torch.sigmoid(torch.tensor(a)).item() - (w01 + w), 0.0, 5.0)
    assert theta.tolist() == pytest.approx([a, -a, 0.0], abs=1e-6)
    assert a > 0.1  # the human win moves chosen up and rejected down


def test_anchored_trueskill_plays_the_human_game_only_as_strong_as_its_weight():
    wins = torch.tensor([[[0.0, 0.3, 0.5], [0.7, 0.0, 0.5], [0.5, 0.5, 0.0]]], dtype=torch.float64)
    chosen, rejected = torch.tensor([0]), torch.tensor([1])
    plain = trueskill(wins)[0][0]
    assert torch.equal(trueskill(anchor_human_pair(wins, chosen, rejected, 0.0))[0][0], plain)
    assert plain[1] > plain[0]  # Eq. 1 prefers the human-rejected response
    assert torch.equal(trueskill(anchor_human_pair(wins, chosen, rejected, 0.3))[0][0], plain)  # below the margin
    anchored = trueskill(anchor_human_pair(wins, chosen, rejected, 1.0))[0][0]
    assert anchored[0] > anchored[1] and anchored[0] - 25 == pytest.approx(25 - anchored[1])


@pytest.mark.parametrize("mapping", ["identity", "softmax", "zscore"])
def test_trimmed_members_get_no_advantage_and_the_rest_sum_to_zero(mapping):
    ratings = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    adv = sega_advantages(ratings, mapping=mapping, trim=2)
    lowest = ratings.argsort(-1)[:, :2]
    assert torch.equal(adv.gather(-1, lowest), torch.zeros(5, 2))
    assert adv.sum(-1).abs().max() < 1e-6
    assert (adv != 0).sum(-1).eq(4).all()


@pytest.mark.parametrize("trim", [0, 1])
def test_filtered_dpo_pairs_are_the_argmax_and_argmin_of_the_ratings(trim):
    sizes = torch.tensor([4, 6, 4])
    ratings = torch.randn(int(sizes.sum()), generator=torch.Generator().manual_seed(1))
    first = 0
    for size, (best, worst) in zip(sizes.tolist(), top_bottom_members(ratings, sizes, trim)):
        group = ratings[first : first + size]
        kept = group.argsort(descending=True)[: size - trim]
        assert best == first + int(group.argmax()) and worst == first + int(kept[-1])
        if trim == 0:
            assert worst == first + int(group.argmin())
        first += size


def _anchored_sega(tok, labelled_first: bool = True, **flat) -> SEGA:
    rows = [PreferencePair("Q1: 1+3=", "4 since 1+3", "5"), "Q2: 2+6="]
    rows = rows if labelled_first else rows[::-1]
    cfg = TrainConfig.from_flat({"objective": "sega", "k": 2, "batch_size": 2, "gen_max_new_tokens": 6,
                                 "ranking": "bradley_terry", "reward_mapping": "zscore", **flat})
    return SEGA(cfg, DistEnv.single(), rows, tok)


@pytest.mark.parametrize("order", [True, False])
def test_an_anchored_group_holds_k_candidates_and_the_human_pair_beside_a_plain_one(tok, order):
    policy = PolicyLoss(tiny_model(tok))
    sega = _anchored_sega(tok, order, anchor_weight=50.0)
    index = sega.micro_pairs(0, 0)
    (mb,), stats = sega.step_batches(policy, step=0)
    labelled_first = isinstance(index[0], PreferencePair)
    sizes = [4, 2] if labelled_first else [2, 4]
    assert mb.token_weights.shape[0] == 6
    adv = mb.token_weights[:, 0] * 2  # weights are A / (batch_size x grad_accum)
    groups = adv.split(sizes)
    for group in groups:
        assert abs(float(group.sum())) < 1e-6
    anchored = groups[0] if labelled_first else groups[1]
    assert anchored[2] > anchored[3]  # the human win carries the chosen response above the rejected one
    start = 0 if labelled_first else 2
    responses = [tok.decode(mb.batch.input_ids[r][mb.batch.response_mask[r]]) for r in (start + 2, start + 3)]
    assert responses == ["4 since 1+3<eos>", "5<eos>"]
    assert math.isfinite(float(stats["score_mean"]))


def test_trim_zeroes_the_lowest_member_of_every_group(tok):
    policy = PolicyLoss(tiny_model(tok))
    sega = _anchored_sega(tok, anchor_weight=1.0, trim=1, reward_mapping="identity")
    (mb,), _ = sega.step_batches(policy, step=0)
    sizes = [4, 2] if isinstance(sega.micro_pairs(0, 0)[0], PreferencePair) else [2, 4]
    for group in mb.token_weights[:, 0].split(sizes):
        assert (group == 0).sum() >= 1 and abs(float(group.sum())) < 1e-6


def test_filtering_settings_are_checked_before_anything_loads():
    with pytest.raises(UsageError, match="--anchor_weight 1.0 needs --ranking"):
        TrainConfig.from_flat({"objective": "sega", "anchor_weight": 1.0})
    with pytest.raises(UsageError, match="--trim 4: at most k - 1 = 3"):
        TrainConfig.from_flat({"objective": "sega", "k": 4, "trim": 4})
    with pytest.raises(UsageError, match="--trim 3: at most k - 2 = 2 with --k 4 and --filtered_dpo"):
        TrainConfig.from_flat({"objective": "sega", "k": 4, "trim": 3, "filtered_dpo": True})


def _mixed_rows(tmp_path):
    model_dir, pairs = write_run_inputs(tmp_path, n_pairs=2)
    data = tmp_path / "mixed.jsonl"
    data.write_text(pairs.read_text() + "".join(json.dumps({"prompt": f"Q{i}: {i}+{i}="}) + "\n" for i in (5, 6)))
    return model_dir, data


def test_sega_trains_on_labelled_and_unlabelled_rows_with_anchors(tmp_path):
    model_dir, data = _mixed_rows(tmp_path)
    cfg = run_config(model_dir, data, tmp_path / "out", objective="sega", k=2, gen_max_new_tokens=4, batch_size=2,
                     max_steps=2, export_hf=False, ranking="trueskill", anchor_weight=1.0, trim=1,
                     log_samples_every=1)
    result = train(cfg)
    assert result.steps_done == 2 and all(math.isfinite(x) for x in result.losses)
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert {len(r["candidates"]) for r in records if r["anchored"]} <= {4}
    assert {len(r["candidates"]) for r in records if not r["anchored"]} <= {2}


def test_filtered_dpo_trains_on_one_self_ranked_pair_per_row_from_the_reference(tmp_path):
    model_dir, data = _mixed_rows(tmp_path)
    cfg = run_config(model_dir, data, tmp_path / "out", objective="sega", k=3, gen_max_new_tokens=4, batch_size=2,
                     max_steps=2, export_hf=False, ranking="bradley_terry", anchor_weight=1.0, trim=1,
                     filtered_dpo=True, dpo_beta=0.5)
    result = train(cfg)
    assert result.steps_done == 2
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts at the reference
    pairs = [json.loads(line) for line in (tmp_path / "out" / "filtered_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 4 and [p["prompt"] for p in pairs] == [json.loads(r)["prompt"] for r in
                                                               data.read_text().splitlines()]


def test_final_weight_zero_drops_the_terminal_term_from_scores_and_wins():
    from gem_fast.ranking import entropy_wins
    from gem_fast.scoring import entropy_score

    entropy = torch.tensor([[[3.0, 1.0, 0.1], [1.0, 2.0, 2.0]]])
    valid = torch.ones_like(entropy, dtype=torch.bool)
    final = torch.tensor([[[False, False, True]] * 2])
    fork = valid & ~final
    plain = entropy_score(entropy, final, valid, lambda_fork=0.5, top_m=2)
    assert plain[0].tolist() == pytest.approx([-0.1 + 0.5 * 2.0, -2.0 + 0.5 * 1.5])
    assert entropy_score(entropy, final, valid, lambda_fork=0.5, top_m=2, final_weight=0.0)[0].tolist() == \
        pytest.approx([0.5 * 2.0, 0.5 * 1.5])
    # Answer entropy 0.1 < 2.0: 0 wins the terminal comparison; fork entropies {3, 1} vs {1, 2}: 0 wins 5/8.
    assert entropy_wins(entropy, final, fork, lambda_fork=0.5)[0, 0, 1].item() == pytest.approx((1 + 0.5 * 5 / 8) / 1.5)
    assert entropy_wins(entropy, final, fork, lambda_fork=0.5, final_weight=0.0)[0, 0, 1].item() == \
        pytest.approx(5 / 8)
    with pytest.raises(UsageError, match="no term"):
        TrainConfig.from_flat({"objective": "sega", "final_weight": 0.0, "lambda_fork": 0.0})


@pytest.mark.parametrize("ranking", ["bradley_terry", "trueskill"])
def test_the_human_win_reaches_an_anchored_group_after_a_plain_one(ranking):
    # Group 0: k = 2 sampled candidates; group 1: 2 candidates, then chosen and rejected, whose answer
    # entropies (last token) make Eq. 1 prefer the rejected response.
    answer = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 3.0, 0.1]
    entropy = torch.tensor([[1.0, 0.5]] * 4 + [[1.0, a] for a in answer[6:]])
    groups = Groups(torch.zeros(6, 2, dtype=torch.long), entropy, torch.ones(6, 2, dtype=torch.bool),
                    torch.tensor([2, 4]), (False, True))
    ratings = {}
    for weight in (0.0, 50.0):
        cfg = TrainConfig.from_flat({"objective": "sega", "k": 2, "ranking": ranking, "anchor_weight": weight,
                                     "final_span": "last_fraction", "final_fraction": 0.5})
        scores, ratings[weight] = SEGA(cfg, DistEnv.single(), [], None).rate_groups(groups)
        assert scores[4] < scores[5]  # Eq. 1 alone prefers the rejected response
    assert torch.equal(ratings[0.0][:2], ratings[50.0][:2])  # the plain group is untouched
    assert ratings[50.0][4] > ratings[0.0][4] and ratings[50.0][5] < ratings[0.0][5]
    assert ratings[0.0][4] < ratings[0.0][5]
    if ranking == "bradley_terry":  # TrueSkill plays the human game once, among the others: it cannot outvote them
        assert ratings[50.0][4] > ratings[50.0][5]
