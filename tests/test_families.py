"""Every causal-LM family of the installed transformers (not a hand-picked list), as a tiny random
fp32 model: patch_causal_lm either matches the model's own logits (log-probs, entropy, gradients)
or refuses it by name; tests/tiny_families.py builds them and writes the README's support table."""

from __future__ import annotations

import pytest

from tiny_families import FAMILIES, check_family


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_matches_its_own_logits_or_is_refused_by_name(model_type):
    check_family(model_type)
