"""Reward mappings, group advantages, and the SEGA token weights through the policy loss (gem_fast/advantages.py)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_lm import tiny_model

from gem_fast.advantages import map_rewards, sega_advantages, sega_token_weights
from gem_fast.data import encode_prompt_responses
from gem_fast.logprobs import sequence_logprobs
from gem_fast.policy import PolicyLoss

INF = math.inf


def assert_values(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6)


@pytest.fixture
def model(tok):
    return tiny_model(tok, seed=1)


def test_mappings_by_hand():
    scores = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    assert_values(map_rewards(scores, mapping="softmax"), [[0.25, 0.75], [0.5, 0.5]])
    # Temperature 2 halves the log-odds: softmax([0, log 3 / 2]) = [1, sqrt 3] / (1 + sqrt 3).
    hot = map_rewards(scores[:1], mapping="softmax", temperature=2.0)
    assert_values(hot, [[1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]])
    assert torch.equal(map_rewards(scores, mapping="identity"), scores)


def test_advantages_by_hand_and_zero_mean():
    identity = sega_advantages(torch.tensor([[1.0, 2.0, 6.0]]), mapping="identity")
    assert_values(identity, [[-2.0, -1.0, 3.0]])
    softmax = sega_advantages(torch.tensor([[0.0, math.log(3.0)]]))
    assert_values(softmax, [[-0.25, 0.25]])
    torch.manual_seed(0)
    many = sega_advantages(torch.randn(4, 5), temperature=0.5)
    assert torch.allclose(many.sum(-1), torch.zeros(4), atol=1e-6)


def test_zscore_is_the_official_normalisation():
    # (S - mean) / std with Bessel's correction: [1, 2, 6] -> mean 3, std sqrt(7).
    z = sega_advantages(torch.tensor([[1.0, 2.0, 6.0]]), mapping="zscore")
    assert_values(z, [[-2 / math.sqrt(7), -1 / math.sqrt(7), 3 / math.sqrt(7)]])
    torch.manual_seed(0)
    many = sega_advantages(torch.randn(4, 5) * 1e-3, mapping="zscore")
    assert torch.allclose(many.std(-1), torch.ones(4), atol=1e-4)  # scale-free: tiny spreads become unit
    # No spread (or one candidate): only centred, as the official code skips the division.
    assert sega_advantages(torch.tensor([[2.0, 2.0 + 1e-8]]), mapping="zscore").abs().max() < 1e-7
    # -inf takes the group's lowest finite score; a trimmed candidate gets 0 and leaves the std.
    assert_values(sega_advantages(torch.tensor([[-INF, 1.0, 3.0]]), mapping="zscore"),
                  [[-1 / math.sqrt(3), -1 / math.sqrt(3), 2 / math.sqrt(3)]])
    assert_values(sega_advantages(torch.tensor([[0.0, 1.0, 3.0]]), mapping="zscore", trim=1),
                  [[0.0, -1 / math.sqrt(2), 1 / math.sqrt(2)]])


def test_trimming_drops_the_lowest_before_mapping():
    scores = torch.tensor([[1.0, 2.0, 6.0]])
    assert_values(sega_advantages(scores, mapping="identity", trim=1), [[0.0, -2.0, 2.0]])
    # softmax over the kept [2, 2 + log 3] -> [0.25, 0.75]; the trimmed one gets 0.
    kept = torch.tensor([[1.0, 2.0, 2.0 + math.log(3.0)]])
    assert_values(sega_advantages(kept, trim=1), [[0.0, -0.25, 0.25]])
    with pytest.raises(ValueError, match="trim"):
        sega_advantages(scores, trim=3)


def test_minus_inf_scores_rank_lowest_and_empty_groups_get_no_advantage():
    scores = torch.tensor([[-INF, 1.0, 3.0], [-INF, -INF, -INF]])
    identity = sega_advantages(scores, mapping="identity")
    assert_values(identity[0], [-2 / 3, -2 / 3, 4 / 3])
    assert identity[1].tolist() == [0.0, 0.0, 0.0]
    soft = sega_advantages(scores)
    e = math.exp(2.0)
    assert_values(soft[0], [-1 / 3, 1 / (1 + e) - 1 / 3, e / (1 + e) - 1 / 3])
    assert soft[1].tolist() == [0.0, 0.0, 0.0]
    # Tied -inf candidates are trimmed from the highest index; the kept one gets reward 0.
    assert_values(sega_advantages(torch.tensor([[-INF, -INF, 0.0]]), trim=1), [[-0.5, 0.0, 0.5]])


@pytest.mark.parametrize("kwargs, name", [(dict(mapping="rank"), "mapping"), (dict(temperature=0.0), "temperature")])
def test_advantages_reject_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sega_advantages(torch.zeros(1, 3), **kwargs)


def candidate_batch(tok):
    prompts = ["Q: 2+2?"] * 3 + ["Say hi"] * 3
    responses = [" 4", " 5", " 22", " hi", " no", " hello"]
    return encode_prompt_responses(tok, prompts, responses)


def sega_loss(model: torch.nn.Module, batch, advantages: torch.Tensor, groups: float) -> torch.Tensor:
    """Eq. 2 as the engine computes it: SEGA token weights into the policy's fused loss."""
    weights = sega_token_weights(advantages, groups, batch.input_ids.shape[1] - 1)
    return PolicyLoss(model, backend="torch")(batch.input_ids, batch.attention_mask, batch.response_mask, weights)


@pytest.mark.parametrize("groups", [2, 8])
def test_sega_loss_value_and_gradient_match_the_formula(model, tok, groups):
    batch = candidate_batch(tok)
    advantages = torch.tensor([[1.0, -0.25, -0.75], [0.5, 0.0, -0.5]])
    loss = sega_loss(model, batch, advantages, groups)
    loss.backward()
    fused_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()

    expected = -(advantages.flatten() * sequence_logprobs(model, batch, backend="naive")).sum() / groups
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(fused_grad, model.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-5)


def test_sega_step_raises_log_prob_of_positive_advantage_candidates(model, tok):
    batch = candidate_batch(tok)
    advantages = sega_advantages(torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, -2.0]]), mapping="identity")
    with torch.no_grad():
        before = sequence_logprobs(model, batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
    loss = sega_loss(model, batch, advantages, groups=2)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        change = sequence_logprobs(model, batch) - before
    best, worst = torch.tensor([0, 4]), torch.tensor([2, 5])
    assert (change[best] > 0).all(), change
    assert (change[worst] < 0).all(), change
    # To first order a gradient step gives Σ A_i Δlog π_i = lr · B · |∇L|² > 0.
    assert (advantages.flatten() * change).sum() > 0


def test_sega_token_weights_shape_and_checks():
    weights = sega_token_weights(torch.tensor([[1.0, -1.0], [0.5, -0.5]]), 4, width=3)
    assert weights.shape == (4, 3) and weights.dtype == torch.float32
    assert_values(weights[:, 0], [0.25, -0.25, 0.125, -0.125])
    assert torch.equal(weights, weights[:, :1].expand(-1, 3))
    with pytest.raises(ValueError, match="advantages"):
        sega_token_weights(torch.zeros(2, 2, 2), 2, width=3)
    with pytest.raises(ValueError, match="groups"):
        sega_token_weights(torch.zeros(2, 2), 0, width=3)
