"""gem_fast.prefix_attention: the shared-prefix attention op against SDPA on the concatenated K/V
(its decoder runs in tests/test_sampling.py through ``sample_group(strategy="shared_prefix")``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gem_fast.prefix_attention import shared_prefix_attention


@pytest.mark.parametrize("q_len", [1, 3])
def test_shared_prefix_attention_equals_sdpa_on_concatenated_kv(q_len):
    g, k, hq, hkv, p, s, d = 3, 4, 6, 2, 7, 5, 8
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q, pk, pv = rand(g * k, hq, q_len, d), rand(g, hkv, p, d), rand(g, hkv, p, d)
    # Suffix K/V as non-contiguous views, as attention layers may hand them over.
    sk, sv = rand(g * k, s, hkv, d).transpose(1, 2), rand(g * k, s, hkv, d).transpose(1, 2)
    prefix_mask = torch.ones(g, p, dtype=torch.bool)
    prefix_mask[0, :3] = prefix_mask[2, :1] = False  # left padding
    out = shared_prefix_attention(q, pk, pv, sk, sv, prefix_mask=prefix_mask)

    keys = torch.cat([pk.repeat_interleave(k, 0), sk], 2).repeat_interleave(hq // hkv, 1)
    values = torch.cat([pv.repeat_interleave(k, 0), sv], 2).repeat_interleave(hq // hkv, 1)
    allowed = torch.ones(g * k, 1, q_len, p + s, dtype=torch.bool)
    allowed[..., :p] = prefix_mask.repeat_interleave(k, 0)[:, None, None, :]
    allowed[..., p:] = torch.ones(q_len, s, dtype=torch.bool).tril(s - q_len)
    ref = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
