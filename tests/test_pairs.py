"""DPO and IPO (gem_fast/objectives/pairs.py): the losses against their formulas, and the baselines with a
cached reference of the same model."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_lm import tiny_model

from gem_fast.data import PreferencePair, encode_pairs
from gem_fast.logprobs import pair_logprobs
from gem_fast.objectives.pairs import dpo_loss, ipo_loss, preference_loss


def assert_values(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6)


@pytest.fixture
def model(tok):
    return tiny_model(tok, seed=1)


PAIRS = [PreferencePair("Q: 2+2?", " 4", " 5"), PreferencePair("Say hi", " hello", " no")]


def test_dpo_and_ipo_against_their_formulas():
    policy_chosen = torch.tensor([-1.0, -4.0], requires_grad=True)
    policy_rejected = torch.tensor([-3.0, -2.0])
    ref_chosen = torch.tensor([-2.0, -4.0], requires_grad=True)
    ref_rejected = torch.tensor([-2.5, -3.0])
    # Margins: (2 - 0.5) = 1.5 and (-2 - (-1)) = -1; beta = 0.5.
    dpo = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5)
    expected = (math.log1p(math.exp(-0.75)) + math.log1p(math.exp(0.5))) / 2
    assert dpo.item() == pytest.approx(expected)
    dpo.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert_values(policy_chosen.grad, [-0.5 * sig(-0.75) / 2, -0.5 * sig(0.5) / 2])
    assert ref_chosen.grad is None  # the reference is never trained through
    ipo = ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5)
    assert ipo.item() == pytest.approx(((1.5 - 1.0) ** 2 + (-1.0 - 1.0) ** 2) / 2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.0)
    with pytest.raises(ValueError, match="ref_rejected"):
        ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected[:1])


@pytest.mark.parametrize("length_normalize", [False, True])
def test_dpo_ipo_baselines_with_cached_reference_of_the_same_model(model, tok, length_normalize):
    # Reference == policy: every margin is 0, so DPO = log 2 and IPO = (1 / (2 beta))^2.
    cached = pair_logprobs(model, tok, PAIRS + [PreferencePair("x", "y", "z")], backend="torch")
    reference = cached.select(torch.tensor([0, 1]))
    batch = encode_pairs(tok, PAIRS)
    opts = dict(beta=0.5, length_normalize=length_normalize, backend="torch")
    dpo = preference_loss("dpo", model, batch, reference, **opts)
    assert dpo.item() == pytest.approx(math.log(2), abs=1e-5)
    dpo.backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    ipo = preference_loss("ipo", model, batch, reference, **opts)
    assert ipo.item() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="reference"):
        preference_loss("dpo", model, batch, None)
    with pytest.raises(ValueError, match="kind"):
        preference_loss("sega", model, batch, reference)
