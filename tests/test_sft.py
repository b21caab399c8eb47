"""SFT (gem_fast/objectives/sft.py): the baseline loss is the mean response NLL."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import tiny_model

from gem_fast.config import TrainConfig
from gem_fast.data import PreferencePair, encode_pairs
from gem_fast.distributed import DistEnv
from gem_fast.objectives import SFT
from gem_fast.policy import PolicyLoss


@pytest.fixture
def model(tok):
    return tiny_model(tok, seed=1)


PAIRS = [PreferencePair("Q: 2+2?", " 4", " 5"), PreferencePair("Say hi", " hello", " no")]


def test_sft_baseline_is_the_mean_response_nll(model, tok):
    policy = PolicyLoss(model, backend="torch")
    (mb,), stats = SFT(TrainConfig.from_flat({"batch_size": 2}), DistEnv.single(), PAIRS, tok).step_batches(policy, 0)
    loss = policy(mb.batch.input_ids, mb.batch.attention_mask, mb.batch.response_mask, mb.token_weights)
    chosen = encode_pairs(tok, PAIRS).rows(slice(0, 2))
    labels = torch.where(chosen.response_mask, chosen.input_ids, -100)
    reference = model(input_ids=chosen.input_ids, attention_mask=chosen.attention_mask, labels=labels).loss
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert stats["tokens_per_rank"].item() == (labels[:, 1:] != -100).sum().item()
