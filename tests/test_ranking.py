"""Ranking: win matrices, Bradley-Terry (MM / Newton), TrueSkill update, trimming and pairing."""

from __future__ import annotations

import math

import pytest
import torch

from gem_fast.ranking import (
    anchor_human_pair,
    bradley_terry,
    candidate_ratings,
    entropy_wins,
    rank_order,
    top_bottom_pairs,
    trim_mask,
    trueskill,
    wins_from_scores,
    wins_from_tokens,
)

INF = math.inf


def test_rank_order_is_stable_and_puts_minus_inf_last():
    ratings = torch.tensor([[1.0, -INF, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert rank_order(ratings).tolist() == [[2, 0, 3, 1], [0, 1, 2, 3]]


def test_wins_from_scores():
    wins = wins_from_scores(torch.tensor([2.0, 1.0, 2.0]))
    assert wins.tolist() == [[0.0, 1.0, 0.5], [0.0, 0.0, 0.0], [0.5, 1.0, 0.0]]


def test_wins_from_tokens_by_hand():
    values = torch.tensor([[[1.0, 3.0, 0.0], [2.0, 2.0, 0.0], [2.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    mask = torch.tensor([[[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]]], dtype=torch.bool)
    w = wins_from_tokens(values, mask)[0]
    # 0 vs 1: of {1,3} x {2,2,0}: 1>0, 3>2, 3>2, 3>0 -> 4 of 6.
    assert w[0, 1].item() == pytest.approx(4 / 6)
    assert w[1, 0].item() == pytest.approx(2 / 6)
    # 1 vs 2: of {2,2,0} x {2}: two ties (half each), one loss -> 1 of 3.
    assert w[1, 2].item() == pytest.approx(1 / 3)
    # Candidate 3 has no tokens: it loses to everyone with tokens.
    assert w[3, :3].tolist() == [0.0, 0.0, 0.0]
    assert w[:3, 3].tolist() == [1.0, 1.0, 1.0]
    assert torch.diagonal(w).tolist() == [0.0] * 4


def test_wins_from_tokens_matches_brute_force_and_both_empty_tie():
    torch.manual_seed(0)
    values = torch.randint(0, 4, (2, 3, 6)).float()  # many ties
    mask = torch.rand(2, 3, 6) < 0.7
    mask[1, 2] = False
    mask[1, 1] = False
    w = wins_from_tokens(values, mask)
    for g in range(2):
        for i in range(3):
            for j in range(3):
                a, b = values[g, i][mask[g, i]], values[g, j][mask[g, j]]
                if i == j:
                    expected = 0.0
                elif len(a) and len(b):
                    cmp = a[:, None] - b[None, :]
                    expected = ((cmp > 0).float() + 0.5 * (cmp == 0).float()).mean().item()
                else:
                    expected = 0.5 if not len(a) and not len(b) else float(len(a) > 0)
                assert w[g, i, j].item() == pytest.approx(expected)


def test_entropy_wins_weights_final_and_fork_comparisons():
    entropy = torch.tensor([[[5.0, 0.1], [1.0, 0.9]]])  # token 0 reasoning, token 1 final
    final = torch.tensor([[[False, True], [False, True]]])
    fork = ~final
    w = entropy_wins(entropy, final, fork, lambda_fork=0.25)[0]
    # Candidate 0 wins the final comparison (0.1 < 0.9) and the fork one (5 > 1).
    assert w[0, 1].item() == pytest.approx(1.0)
    entropy2 = torch.tensor([[[5.0, 0.9], [1.0, 0.1]]])  # now it loses the final one only
    w2 = entropy_wins(entropy2, final, fork, lambda_fork=0.25)[0]
    assert w2[0, 1].item() == pytest.approx(0.25 / 1.25)
    assert w2[1, 0].item() == pytest.approx(1 / 1.25)


@pytest.mark.parametrize("method", ["mm", "newton"])
def test_bradley_terry_recovers_known_strengths(method):
    # Expected win counts under known strengths are a fixed point of the likelihood equations.
    strengths = torch.tensor([[4.0, 2.0, 1.0, 0.5], [1.0, 1.0, 3.0, 9.0]], dtype=torch.float64)
    p_i, p_j = strengths.unsqueeze(-1), strengths.unsqueeze(-2)
    wins = 10 * p_i / (p_i + p_j)
    theta = bradley_terry(wins, method=method, prior=0.0)
    expected = strengths.log() - strengths.log().mean(-1, keepdim=True)
    assert torch.allclose(theta, expected, atol=1e-6)


@pytest.mark.parametrize("method", ["mm", "newton"])
def test_bradley_terry_two_players_by_hand(method):
    # A beat B 3 times, B beat A once: theta_A - theta_B = log 3.
    theta = bradley_terry(torch.tensor([[0.0, 3.0], [1.0, 0.0]]), method=method, prior=0.0)
    assert theta.tolist() == pytest.approx([math.log(3) / 2, -math.log(3) / 2], abs=1e-6)


def test_bradley_terry_prior_keeps_a_dominated_candidate_finite_and_last():
    wins = wins_from_scores(torch.tensor([3.0, 2.0, 1.0]))  # candidate 2 never wins
    with pytest.raises(ValueError, match="prior"):
        bradley_terry(wins, prior=0.0)
    mm = bradley_terry(wins, method="mm", prior=0.1)
    newton = bradley_terry(wins, method="newton", prior=0.1)
    assert torch.isfinite(mm).all()
    assert rank_order(mm).tolist() == [0, 1, 2]
    assert torch.allclose(mm, newton, atol=1e-5)


def test_trueskill_single_game_matches_the_update_formulas():
    mu, sigma, beta = 25.0, 25.0 / 3, 25.0 / 6
    c = math.sqrt(2 * beta**2 + 2 * sigma**2)
    v = (1 / math.sqrt(2 * math.pi)) / 0.5  # phi(0) / Phi(0): equal means
    w = v * v
    means, sigmas = trueskill(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))  # candidate 1 won
    assert means.tolist() == pytest.approx([mu - sigma**2 / c * v, mu + sigma**2 / c * v])
    shrunk = sigma * math.sqrt(1 - sigma**2 / c**2 * w)
    assert sigmas.tolist() == pytest.approx([shrunk, shrunk])


def test_trueskill_orders_a_round_robin_and_skips_ties():
    means, _ = trueskill(wins_from_scores(torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])))
    assert rank_order(means[0]).tolist() == [1, 2, 0]
    assert means[1].tolist() == [25.0, 25.0, 25.0]


def test_anchor_human_pair_breaks_a_tie_in_favour_of_chosen():
    wins = wins_from_scores(torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]))
    anchored = anchor_human_pair(wins, torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([2.0, 0.0]))
    assert anchored[0, 1, 0].item() == pytest.approx(2.5)
    assert torch.equal(anchored[1], wins[1])
    theta = bradley_terry(anchored)
    assert theta[0, 1] > theta[0, 0]
    assert theta[1, 0].item() == pytest.approx(theta[1, 1].item(), abs=1e-6)
    with pytest.raises(ValueError, match="differ"):
        anchor_human_pair(wins, torch.tensor([1, 0]), torch.tensor([1, 1]))


def test_candidate_ratings_methods_agree_on_a_clear_order():
    scores = torch.tensor([[0.3, -1.0, 2.0, 0.9]])
    for method in ("score", "bradley_terry", "trueskill"):
        assert rank_order(candidate_ratings(scores, method=method))[0].tolist() == [2, 3, 0, 1]
    with pytest.raises(ValueError, match="method"):
        candidate_ratings(scores, method="elo")


def test_trim_and_top_bottom_pairs():
    ratings = torch.tensor([[0.5, 2.0, -1.0, 1.0, 0.0]])
    assert trim_mask(ratings, 2).tolist() == [[True, True, False, True, False]]
    assert trim_mask(ratings, 0).all()
    assert top_bottom_pairs(ratings, 2).tolist() == [[[1, 2], [3, 4]]]
    # After trimming the 2 lowest, the worst kept candidate is 0.
    assert top_bottom_pairs(ratings, 1, trim=2).tolist() == [[[1, 0]]]
    with pytest.raises(ValueError, match="trim"):
        trim_mask(ratings, 5)
    with pytest.raises(ValueError, match="n_pairs"):
        top_bottom_pairs(ratings, 2, trim=2)


def test_bad_win_matrices_are_rejected():
    with pytest.raises(ValueError, match="wins"):
        bradley_terry(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="non-negative"):
        trueskill(torch.tensor([[0.0, -1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="method"):
        bradley_terry(torch.ones(2, 2), method="lbfgs")
