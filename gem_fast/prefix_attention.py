"""Prefix sharing in decoding: k samples attend to one stored copy of their prompt's K/V.

:func:`shared_prefix_attention` is the attention op. The scores against the prompt keys are one
GEMM per (prompt, KV head) whose rows are all k samples and all query heads of the group; the
scores against each sample's own generated keys are a small batched GEMM. One softmax over the
two score blocks side by side gives exactly the attention over the concatenated keys, so the
prompt K/V is never repeated k times.

:class:`SharedPrefixDecoder` is ``sample_group``'s ``"shared_prefix"`` strategy: during a decode
step every attention layer is routed (through transformers' ``AttentionInterface``) to that op;
:func:`shared_prefix_unsupported` says which models it can run (the packed training layout of
:mod:`gem_fast.prefix_sharing` has the same limits and more). :mod:`gem_fast.static_decode` runs
the same op with static shapes.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator

import torch
from transformers import DynamicCache

try:  # transformers >= 4.48
    from transformers.modeling_utils import AttentionInterface
except ImportError:  # pragma: no cover - depends on the installed transformers
    AttentionInterface = None

__all__ = ["shared_prefix_attention", "shared_prefix_unsupported", "modeling_module_has", "SharedPrefixDecoder"]

_ATTN_NAME = "gem_fast_shared_prefix"


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


def modeling_module_has(model: torch.nn.Module, name: str) -> bool:
    """Whether a modeling file of ``model``'s class or its bases defines or imports ``name`` (how
    transformers' code shows it dispatches through an interface: ``ALL_ATTENTION_FUNCTIONS``,
    ``create_causal_mask``)."""
    modules = (sys.modules.get(cls.__module__) for cls in type(model).__mro__)
    return any(hasattr(m, name) for m in modules if m is not None)


def shared_prefix_unsupported(model: torch.nn.Module) -> str | None:
    """Why the shared-prefix path cannot run on ``model`` (None when it can)."""
    if AttentionInterface is None:
        return "this transformers has no AttentionInterface"
    config = model.config
    layer_types = getattr(config, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))} are not all full attention"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    # Modeling files that dispatch attention through the interface import ALL_ATTENTION_FUNCTIONS.
    if not modeling_module_has(model, "ALL_ATTENTION_FUNCTIONS"):
        return f"{type(model).__name__} does not dispatch attention through AttentionInterface"
    return None


_ACTIVE_DECODER: contextvars.ContextVar[SharedPrefixDecoder | None] = contextvars.ContextVar(
    "gem_fast_shared_prefix_decoder", default=None
)


class SharedPrefixDecoder:
    """Prompt K/V kept once per prompt; decode steps attend to it through :func:`shared_prefix_attention`.

    Groups stay whole (all k rows of a prompt) so the prefix GEMM keeps k query rows per prompt;
    a prompt leaves the batch when all its k candidates have finished.
    """

    def __init__(self, model: torch.nn.Module, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]],
                 attention_mask: torch.Tensor, k: int, logits_kwargs: dict, suffix: DynamicCache):
        """``prefix_kv``: per layer the prefill's (keys, values) [B, Hkv, P, D]; ``attention_mask`` [B, P] of
        the prompts; ``suffix``: an empty cache for the generated K/V."""
        if _ATTN_NAME not in AttentionInterface._global_mapping:
            AttentionInterface.register(_ATTN_NAME, _shared_prefix_attention_forward)
        self.prefix_keys = [key for key, _ in prefix_kv]  # per layer [B, Hkv, P, D]
        self.prefix_values = [value for _, value in prefix_kv]
        self.prefix_mask = attention_mask.bool()  # [B, P]
        self.prompt_kv_bytes = sum(t.numel() * t.element_size() for pair in prefix_kv for t in pair)
        self.suffix = suffix
        self.model, self.k, self.logits_kwargs = model, k, logits_kwargs
        self.calls = 0

    def keep(self, alive: torch.Tensor) -> torch.Tensor:
        return alive.view(-1, self.k).any(dim=1).repeat_interleave(self.k)

    def select(self, kept: torch.Tensor) -> None:
        groups = kept[:: self.k] // self.k  # kept rows are whole groups of k, in order
        self.prefix_keys = [t[groups] for t in self.prefix_keys]
        self.prefix_values = [t[groups] for t in self.prefix_values]
        self.prefix_mask = self.prefix_mask[groups]
        self.suffix.batch_select_indices(kept)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.calls = 0
        with _attention_routed_to(self):
            out = self.model(
                input_ids=tokens[:, None],
                position_ids=positions[:, None],
                past_key_values=self.suffix,
                use_cache=True,
                **self.logits_kwargs,
            )
        if self.calls != len(self.prefix_keys):
            raise RuntimeError(
                f"shared_prefix: {self.calls} of {len(self.prefix_keys)} attention layers went through "
                f"transformers' AttentionInterface for {type(self.model).__name__}; use strategy='expand'"
            )
        return out.logits[:, -1]

    def attend(self, module: torch.nn.Module, query, key, value, scaling: float | None) -> torch.Tensor:
        """HF attention-interface call for one layer: query [N, Hq, L, D], key/value = the suffix cache."""
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise RuntimeError(f"shared_prefix: attention module {type(module).__name__} has no layer_idx")
        self.calls += 1
        out = shared_prefix_attention(
            query,
            self.prefix_keys[layer],
            self.prefix_values[layer],
            key,
            value,
            prefix_mask=self.prefix_mask,
            scale=scaling,
        )
        return out.transpose(1, 2).contiguous()  # HF attention functions return [N, L, Hq, D]


def _shared_prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Entry registered in transformers' AttentionInterface; the mask is ignored (prefix mask lives in the decoder)."""
    decoder = _ACTIVE_DECODER.get()
    if decoder is None:
        raise RuntimeError(f"attn_implementation {_ATTN_NAME!r} is only valid inside gem_fast.sampling.sample_group")
    return decoder.attend(module, query, key, value, scaling), None


@contextlib.contextmanager
def _attention_routed_to(decoder: SharedPrefixDecoder) -> Iterator[None]:
    """Temporarily switch the model's attention to the shared-prefix function bound to ``decoder``."""
    config = decoder.model.config
    previous = config._attn_implementation
    token = _ACTIVE_DECODER.set(decoder)
    config._attn_implementation = _ATTN_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _ACTIVE_DECODER.reset(token)
