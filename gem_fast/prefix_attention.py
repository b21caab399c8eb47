"""Shared-prefix attention: k samples attend to one stored copy of their prompt's K/V.

The scores against the prompt keys are one GEMM per (prompt, KV head) whose rows are all k
samples and all query heads of the group; the scores against each sample's own generated keys
are a small batched GEMM. One softmax over the two score blocks side by side gives exactly the
attention over the concatenated keys, so the prompt K/V is never repeated k times.
"""

from __future__ import annotations

import torch


def shared_prefix_attention(
    query: torch.Tensor,
    prefix_key: torch.Tensor,
    prefix_value: torch.Tensor,
    suffix_key: torch.Tensor,
    suffix_value: torch.Tensor,
    *,
    prefix_mask: torch.Tensor | None = None,
    suffix_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of ``query`` over each row's prompt K/V followed by its own generated K/V.

    query        [G*k, Hq, L, D]: L new tokens of k samples for each of G prompts, prompt-major rows.
    prefix_key   [G, Hkv, P, D], prefix_value [G, Hkv, P, D]: the prompts' K/V, one copy per prompt.
    suffix_key   [G*k, Hkv, S, D], suffix_value likewise: each sample's generated tokens, the last L
                 of which are the queries' own (causal within the suffix), S >= L.
    prefix_mask  [G, P] bool, True for real prompt tokens (left padding False); None: all real.
    suffix_mask  [S] bool, True for suffix slots that hold keys (a preallocated buffer not yet filled
                 is False), the same for every row; None: all S hold keys.
    softcap      scores become softcap * tanh(scores / softcap) before masking (Gemma 2); None: not capped.
    Returns [G*k, Hq, L, D] in ``query``'s dtype. Hq must be a multiple of Hkv (grouped-query attention:
    query head h reads KV head h // (Hq / Hkv)). The softmax runs in float32 (float64 inputs stay float64).
    """
    n, hq, q_len, d = query.shape
    g, hkv, p, _ = prefix_key.shape
    s = suffix_key.shape[2]
    if n % g or hq % hkv:
        raise ValueError(f"query: {n} rows x {hq} heads do not divide into {g} prompts x {hkv} KV heads")
    if suffix_key.shape[:2] != (n, hkv) or s < q_len:
        raise ValueError(f"suffix_key: expected [{n}, {hkv}, >= {q_len}, {d}], got {tuple(suffix_key.shape)}")
    k, group = n // g, hq // hkv
    scale = d**-0.5 if scale is None else scale
    rows = group * q_len  # query rows that read one KV head of one sample

    # Layout [G, Hkv, k, rows, D]: the k samples' queries for one (prompt, KV head) are contiguous rows,
    # so the prefix scores are one [k*rows, P] GEMM against that prompt's keys.
    q = (query * scale).reshape(g, k, hkv, rows, d).transpose(1, 2)
    prefix_scores = _capped(q.reshape(g, hkv, k * rows, d) @ prefix_key.transpose(-1, -2), softcap)
    if prefix_mask is not None:
        prefix_scores = prefix_scores.masked_fill(~prefix_mask[:, None, None, :], float("-inf"))
    suffix_key = suffix_key.view(g, k, hkv, s, d).transpose(1, 2)  # [G, Hkv, k, S, D]
    suffix_scores = _capped(q @ suffix_key.transpose(-1, -2), softcap)  # [G, Hkv, k, rows, S]
    if suffix_mask is not None:
        suffix_scores = suffix_scores.masked_fill(~suffix_mask, float("-inf"))
    if q_len > 1:  # query i (of L) sees suffix keys 0 .. S - L + i
        query_pos = torch.arange(s - q_len, s, device=query.device).repeat(group)  # row r is token r % L
        future = torch.arange(s, device=query.device)[None, :] > query_pos[:, None]
        suffix_scores = suffix_scores.masked_fill(future, float("-inf"))
    # One softmax over [prompt keys ; own keys]: exactly attention over the concatenation, without the concat of K/V.
    scores = torch.cat([prefix_scores, suffix_scores.reshape(g, hkv, k * rows, s)], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    out = probs[..., :p].to(prefix_value.dtype) @ prefix_value  # [G, Hkv, k*rows, D]
    suffix_value = suffix_value.view(g, k, hkv, s, d).transpose(1, 2)
    out = out.view(g, hkv, k, rows, d) + probs[..., p:].view(g, hkv, k, rows, s).to(suffix_value.dtype) @ suffix_value
    return out.transpose(1, 2).reshape(n, hq, q_len, d).to(query.dtype)


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)
