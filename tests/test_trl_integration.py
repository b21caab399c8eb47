"""TRL's GRPO reads per-token log-probs and entropy through ``model(..., labels=, fused_lm_head=True)``
(its own fused head, trl.trainer.utils.add_fused_lm_head). A model patched by gem_fast after TRL
added that head answers the same call from gem_fast's kernels, with TRL's numbers."""

from __future__ import annotations

import copy

import pytest
import torch

from gem_fast.integrations import TrlFusedOutput, patch_causal_lm
from test_integrations import batch, tiny_model

trl_utils = pytest.importorskip("trl.trainer.utils")


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_trl_grpo_call_gets_gem_fast_numbers_equal_to_trls(model_type, monkeypatch):
    import gem_fast.integrations as integrations

    calls = []
    kernel = integrations.fused_logprob_entropy
    monkeypatch.setattr(integrations, "fused_logprob_entropy", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    model = tiny_model(model_type, tied=model_type == "gemma2")
    ids, mask, _ = batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # the prompt: only completion tokens are scored, as GRPO does
    trl_model = copy.deepcopy(model)
    trl_utils.add_fused_lm_head(trl_model, temperature=0.7, outputs=("log_probs", "entropy"))
    want = trl_model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    want_grads = torch.autograd.grad(want.log_probs.sum() + want.entropy.sum(), list(trl_model.parameters()))

    patch_causal_lm(trl_model, temperature=0.7, backend="torch")  # after TRL's head, as on a trainer's model
    calls.clear()  # the patch's own verification
    got = trl_model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert calls == [1]
    assert isinstance(got, TrlFusedOutput) and got.log_probs.shape == want.log_probs.shape == (2, ids.shape[1] - 1)
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.label_mask, want.label_mask)
    grads = torch.autograd.grad(got.log_probs.sum() + got.entropy.sum(), list(trl_model.parameters()))
    for (name, _), g, w in zip(trl_model.named_parameters(), grads, want_grads):
        scale = w.abs().max().item() + 1e-6
        torch.testing.assert_close(g / scale, w / scale, rtol=0, atol=1e-4, msg=name)
