"""Every causal-LM family of the installed transformers (not a hand-picked list), as a tiny random
fp32 model: patch_causal_lm either matches the model's own logits (log-probs, entropy) or refuses
it by name; tests/tiny_families.py builds them and writes the README's support table."""

from __future__ import annotations

import pytest

from tiny_families import FAMILIES, check_family

# Families that must be verified, not merely refused: the common ones, and each output transform
# that output_head reads from the config (a family that loses one would otherwise turn "refused").
MUST_VERIFY = {
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text", "cohere", "gpt2",  # common
    "cohere2", "granite", "granitemoe", "granitemoehybrid", "hyperclovax", "falcon_h1",  # logit scales
    "recurrent_gemma", "xlstm", "gemma4", "inkling_text", "inkling2_text",  # soft-caps, vocab cut
    "minicpm3", "bert", "roberta", "modernbert-decoder",  # hidden-state scaling, prediction-head transforms
}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_matches_its_own_logits_or_is_refused_by_name(model_type):
    outcome = check_family(model_type)
    assert outcome.verified or model_type not in MUST_VERIFY, outcome.reason
