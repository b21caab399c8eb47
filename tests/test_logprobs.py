"""Response log-probs from final hidden states: shift, masking, padding side, backends."""

from __future__ import annotations

import pytest
import torch
from tiny_families import tiny_model as family_model
from tiny_lm import tiny_model

from gem_fast.data import PreferencePair, encode_pairs, encode_prompt_responses
from gem_fast.logprobs import PairLogprobs, output_head, pair_logprobs, sequence_logprobs

PROMPTS = ["Q: 2+2?", "Say hi", "x"]
RESPONSES = [" 4", " hello there", "yz"]


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


def full_logits_reference(model, tok, prompts, responses) -> torch.Tensor:
    """Σ log softmax(logits)[t-1, token_t] over response tokens, one unpadded row at a time."""
    out = []
    for prompt, response in zip(prompts, responses):
        prompt_ids = tok.encode(prompt, add_special_tokens=True)
        response_ids = tok.encode(response, add_special_tokens=False) + [tok.eos_token_id]
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)[0]
        positions = torch.arange(len(prompt_ids), ids.shape[1])
        out.append(logp[positions - 1, ids[0, positions]].sum())
    return torch.stack(out)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sequence_logprobs_match_full_logits_with_either_padding(model, tok, padding_side):
    batch = encode_prompt_responses(tok, PROMPTS, RESPONSES, padding_side=padding_side)
    with torch.no_grad():
        got = sequence_logprobs(model, batch, backend="torch")
    assert torch.allclose(got, full_logits_reference(model, tok, PROMPTS, RESPONSES), atol=1e-4)
    with torch.no_grad():
        mean = sequence_logprobs(model, batch, length_normalize=True, backend="naive")
    lengths = torch.tensor([len(r) + 1 for r in RESPONSES])  # one token per char, plus EOS
    assert torch.allclose(mean, got / lengths, atol=1e-5)


def test_backends_agree_and_gradients_reach_the_model(model, tok):
    batch = encode_prompt_responses(tok, PROMPTS, RESPONSES)
    results = {}
    for backend in ("naive", "torch", "triton"):
        model.zero_grad()
        logp = sequence_logprobs(model, batch, backend=backend)
        logp.sum().backward()
        results[backend] = (logp.detach(), model.model.embed_tokens.weight.grad.clone())
    for backend in ("torch", "triton"):
        assert torch.allclose(results[backend][0], results["naive"][0], atol=1e-4)
        assert torch.allclose(results[backend][1], results["naive"][1], atol=1e-4)
    assert results["naive"][1].abs().sum() > 0
    model.zero_grad()


def test_pair_logprobs_orders_sides_and_counts_tokens_whatever_the_batch_size_and_layout(model, tok, caplog):
    pairs = [PreferencePair(p, r, r[::-1]) for p, r in zip(PROMPTS, RESPONSES)]
    one = pair_logprobs(model, tok, pairs, batch_size=1, backend="torch")
    two = pair_logprobs(model, tok, pairs, batch_size=2, backend="torch")  # prompts shared: the tiny Llama runs sdpa
    repeated = pair_logprobs(model, tok, pairs, batch_size=2, backend="torch", prefix_sharing=False)
    expected_chosen = full_logits_reference(model, tok, PROMPTS, RESPONSES)
    expected_rejected = full_logits_reference(model, tok, PROMPTS, [r[::-1] for r in RESPONSES])
    for got in (one, two, repeated):
        assert torch.allclose(got.chosen, expected_chosen, atol=1e-4)
        assert torch.allclose(got.rejected, expected_rejected, atol=1e-4)
        assert got.chosen_tokens.tolist() == [3, 13, 3]
    encoded = encode_pairs(tok, pairs)
    assert encoded.response_mask.sum(-1).tolist() == [3, 13, 3] * 2
    with caplog.at_level("INFO", logger="gem_fast.logprobs"):
        pair_logprobs(model, tok, pairs, backend="torch")
    assert "each prompt computed once" in caplog.text


def test_pair_logprobs_values_and_select():
    table = PairLogprobs(
        torch.tensor([-6.0, -2.0]), torch.tensor([-3.0, -8.0]), torch.tensor([3, 1]), torch.tensor([1, 4])
    )
    chosen, rejected = table.values(length_normalize=True)
    assert chosen.tolist() == [-2.0, -2.0] and rejected.tolist() == [-3.0, -2.0]
    picked = table.select(torch.tensor([1]))
    assert picked.chosen.tolist() == [-2.0] and picked.rejected_tokens.tolist() == [4]


def test_sequence_logprobs_apply_the_heads_soft_cap(model, tok):
    batch = encode_pairs(tok, [PreferencePair("2+2=", " 4", " 5")], max_length=32)
    model.config.final_logit_softcapping = 0.5  # tiny logits are bent by a cap this low
    try:
        capped = sequence_logprobs(model, batch, backend="torch")
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    finally:
        model.config.final_logit_softcapping = None
    logp = (0.5 * torch.tanh(logits / 0.5)).log_softmax(-1)[:, :-1]
    targets = batch.input_ids[:, 1:]
    picked = logp.gather(-1, targets[..., None]).squeeze(-1)
    expected = torch.where(batch.response_mask[:, 1:], picked, 0.0).sum(-1)
    torch.testing.assert_close(capped.double(), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(capped, sequence_logprobs(model, batch, backend="torch"), atol=1e-3)


@pytest.mark.parametrize("model_type, scale, softcap", [("cohere", 0.5, None), ("gemma2", 1.0, 3.0), ("llama", 1.0, None)])
def test_output_head_reads_scale_and_softcap(model_type, scale, softcap):
    # tiny_families sets Cohere's logit_scale to 0.5 and Gemma-2's final_logit_softcapping to 3.0.
    assert output_head(family_model(model_type))[2:] == (scale, softcap)
