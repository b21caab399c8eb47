"""Group sampler: k candidates per prompt, each prompt prefilled once and its KV cache reused by all k.

Two ways to reuse the prompt's KV cache (``strategy``):

* ``"shared_prefix"``: the prompt K/V is kept once per prompt; during decoding every attention
  layer is routed (through transformers' ``AttentionInterface``) to the shared-prefix attention
  of :mod:`gem_fast.prefix_attention` (:class:`~gem_fast.prefix_attention.SharedPrefixDecoder`),
  which attends to the prompt part from all k samples in one GEMM and merges it with each
  sample's own generated part by log-sum-exp. Prompt KV memory is independent of k.
* ``"expand"``: the prefilled ``DynamicCache`` is repeated k times along the batch
  (``batch_repeat_interleave``) and decoding is plain ``model(...)`` calls. Works for any cache-
  based causal LM (sliding-window and hybrid layers included); prompt KV memory is k times larger.

* ``"static"``: :mod:`gem_fast.static_decode`: the shared-prefix attention with static shapes
  (preallocated generated K/V, finished rows masked, not dropped, sampling on the device), so that on
  CUDA every decode step replays one captured CUDA graph. Needs what ``shared_prefix`` needs, with a
  sliding window longer than the call; otherwise it falls back to the ``auto`` choice, logged.

``"auto"`` takes ``shared_prefix`` when the model's attention dispatches through
``AttentionInterface`` and all layers are full attention, else ``expand``; it does not take
``static`` (on CUDA too) until the GPU suite has shown it faster. The choice is logged once per
model class and reason, and returned in :attr:`GroupSample.strategy`.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from gem_fast.distributed import fsdp_gathered
from gem_fast.kernels import entropy_from_logits
from gem_fast.kernels.sample_rows import SAMPLE_BACKENDS
from gem_fast.prefix_attention import SharedPrefixDecoder, shared_prefix_unsupported
from gem_fast.static_decode import SYNC_EVERY, StaticDecoder, static_decode_unsupported

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "shared_prefix", "expand", "static")


@dataclass
class GroupSample:
    """Result of :func:`sample_group`; rows are prompt-major (row ``b*k + j`` is candidate j of prompt b).

    sequences      [B*k, T] int64: generated tokens only; after EOS (and for T beyond a row's end) ``pad_token_id``.
    token_entropy  [B*k, T] float32: entropy (nats) of softmax(logits / temperature) at each step, before
                   top-p (temperature 0: of softmax(logits)); 0 where ``mask`` is False.
    mask           [B*k, T] bool: valid generated tokens, up to and including EOS.
    strategy       the KV-reuse path that ran: ``"shared_prefix"``, ``"expand"`` or ``"static"``.
    forward_tokens tokens that went through the model: B*P (prefill) + one per active row per decode step
                   (``static``: every row, finished ones included, per step run).
    prompt_kv_bytes bytes of prompt K/V held during decoding (k-independent with ``shared_prefix``).
    T is the number of steps run: ``max_new_tokens``, or fewer when every row hit EOS earlier.
    """

    sequences: torch.Tensor
    token_entropy: torch.Tensor
    mask: torch.Tensor
    strategy: str
    forward_tokens: int
    prompt_kv_bytes: int


def sample_group(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    pad_token_id: int | None = None,
    strategy: str = "auto",
    progress: bool | None = None,
    backend: str = "auto",
    sync_every: int = SYNC_EVERY,
) -> GroupSample:
    """Sample k continuations for each of B left-padded prompts, prefilling each prompt once.

    input_ids [B, P] int, attention_mask [B, P] (1 real token, 0 left padding; None: no padding).
    ``temperature`` 0 is greedy (argmax); otherwise tokens are drawn from softmax(logits / temperature)
    restricted to the smallest set of most probable tokens whose mass reaches ``top_p``, with
    ``generator`` (on the model's device) for reproducibility. A row stops at any of
    ``eos_token_id`` (None: every row runs ``max_new_tokens``). ``pad_token_id`` fills positions after
    EOS (default: the first EOS id, else 0). ``progress``: tqdm bar over steps (None: only on a TTY).
    ``backend``: the :mod:`gem_fast.kernels` backend of the per-step entropy (as the training loss's).
    ``sync_every``: ``static`` only, decode steps between the host checks for "every row has finished".
    With ``static`` the draws come from a seed taken once from ``generator`` (counter-based noise), so
    they differ from the other strategies' draws for the same generator.
    Runs under ``torch.no_grad()``; an FSDP2-wrapped model is all-gathered once for the whole call.
    """
    eos_ids = _check_args(model, input_ids, attention_mask, k, max_new_tokens, temperature, top_p, eos_token_id)
    device = model.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator: on {generator.device}, the model is on {device}")
    input_ids = input_ids.to(device)
    attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(device)
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every: must be an int >= 1, got {sync_every!r}")
    strategy = _choose_strategy(model, strategy, input_ids.shape[1], max_new_tokens)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    logits_kwargs = _last_logits_kwargs(model)
    batch, prompt_len = input_ids.shape
    n = batch * k

    with torch.no_grad(), fsdp_gathered(model):
        # Positions count real tokens only, as in HF generate, so left padding does not shift RoPE.
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_new_cache(model),
            use_cache=True,
            **logits_kwargs,
        )
        if strategy == "static":
            static = StaticDecoder(
                model, _cache_kv(out.past_key_values), attention_mask.bool(), attention_mask.sum(-1), k=k,
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos=eos,
                pad_token_id=pad_token_id, seed=_noise_seed(generator, device), backend=_sampling_backend(backend),
                logits_kwargs=logits_kwargs,
            )
            first_logits = out.logits[:, -1]
            del out
            with tqdm(total=max_new_tokens, desc="sample_group", unit="step",
                      disable=_progress_disabled(progress)) as bar:
                steps = static.run(first_logits, sync_every=sync_every, on_step=lambda: bar.update(1))
            return GroupSample(
                sequences=static.sequences[:, :steps],
                token_entropy=static.token_entropy[:, :steps],
                mask=static.mask[:, :steps],
                strategy=strategy,
                forward_tokens=batch * prompt_len + n * static.steps_run,
                prompt_kv_bytes=static.prompt_kv_bytes,
            )
        if strategy == "shared_prefix":
            decoder = SharedPrefixDecoder(model, _cache_kv(out.past_key_values), attention_mask, k, logits_kwargs,
                                          suffix=_new_cache(model))
        else:
            decoder = _ExpandDecoder(model, out.past_key_values, attention_mask, k, logits_kwargs)
        logits = out.logits[:, -1]  # [B, V]: the k candidates of a prompt share the first step
        del out
        next_position = attention_mask.sum(-1).repeat_interleave(k)  # [N] position of generated token 0

        sequences = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        token_entropy = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)
        mask = torch.zeros((n, max_new_tokens), dtype=torch.bool, device=device)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        rows = torch.arange(n, device=device)  # rows still being decoded, ascending
        forward_tokens = batch * prompt_len
        steps = 0
        bar = tqdm(total=max_new_tokens, desc="sample_group", unit="step", disable=_progress_disabled(progress))
        try:
            for step in range(max_new_tokens):
                tokens, entropy = _next_tokens(logits, temperature, top_p, generator, repeats=k if step == 0 else 1,
                                               backend=backend)
                alive = ~finished[rows]
                tokens = torch.where(alive, tokens, pad_token_id)
                sequences[rows, step] = tokens
                token_entropy[rows, step] = torch.where(alive, entropy, 0.0)
                mask[rows, step] = alive
                steps = step + 1
                bar.update(1)
                if step == max_new_tokens - 1:
                    break
                if eos_ids:
                    finished[rows] = ~alive | torch.isin(tokens, eos)
                    keep = decoder.keep(~finished[rows])
                    # The one host sync per step: stop when every row is done, else drop finished work.
                    n_keep = int(keep.sum())
                    if n_keep == 0:
                        break
                    if n_keep < rows.numel():
                        kept = keep.nonzero().squeeze(1)
                        decoder.select(kept)
                        rows, tokens = rows[kept], tokens[kept]
                        bar.set_postfix(active=n_keep)
                logits = decoder.step(tokens, next_position[rows] + step)
                forward_tokens += rows.numel()
        finally:
            bar.close()

    return GroupSample(
        sequences=sequences[:, :steps],
        token_entropy=token_entropy[:, :steps],
        mask=mask[:, :steps],
        strategy=strategy,
        forward_tokens=forward_tokens,
        prompt_kv_bytes=decoder.prompt_kv_bytes,
    )


def _noise_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """[] int64 on ``device``: the static path's noise seed, one draw from ``generator`` (None: torch's default RNG)."""
    return torch.randint(2**62, (), generator=generator, device=device)


def _sampling_backend(backend: str) -> str:
    """The :func:`sample_tokens` backend for the kernels ``backend`` of the call."""
    if backend == "naive":  # sample_tokens' torch backend is the plain computation
        return "torch"
    if backend in SAMPLE_BACKENDS:
        return backend
    _log_once(logging.INFO, f"sample_group: sample_tokens has no {backend!r} backend; its 'auto' runs")
    return "auto"


def _next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None, repeats: int = 1,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [M, V] -> (tokens [M*repeats] int64, entropy [M*repeats] float32 of softmax(logits / T) before top-p).

    Row i of ``logits`` is the distribution of rows i*repeats .. (i+1)*repeats-1: entropy and the top-p
    nucleus are computed once per distinct row, the draws are independent per output row.
    """
    entropy = entropy_from_logits(logits, temperature=temperature if temperature > 0 else 1.0, backend=backend)
    entropy = entropy.repeat_interleave(repeats)
    if temperature == 0:
        return logits.argmax(-1).repeat_interleave(repeats), entropy
    scores = logits.float() / temperature
    if top_p < 1.0:
        probs = torch.softmax(scores, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass strictly before it is below top_p: the most probable token always stays.
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        scores = scores.masked_fill(torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted), float("-inf"))
    scores = scores.repeat_interleave(repeats, dim=0)
    # Gumbel-max (argmax of scores - log Exp(1) noise) is an exact draw from softmax(scores) and, unlike
    # torch.multinomial, costs a few elementwise passes per row.
    noise = torch.empty_like(scores).exponential_(generator=generator)
    return (scores - noise.log()).argmax(-1), entropy


class _ExpandDecoder:
    """Prompt cache repeated k times along the batch; finished rows are dropped one by one."""

    def __init__(self, model, cache, attention_mask: torch.Tensor, k: int, logits_kwargs: dict):
        cache.batch_repeat_interleave(k)
        self.model, self.cache, self.logits_kwargs = model, cache, logits_kwargs
        self.attention_mask = attention_mask.repeat_interleave(k, dim=0)  # [N, P + generated so far]
        self.prompt_kv_bytes = sum(t.numel() * t.element_size() for pair in _cache_kv(cache) for t in pair)

    def keep(self, alive: torch.Tensor) -> torch.Tensor:
        return alive

    def select(self, kept: torch.Tensor) -> None:
        self.cache.batch_select_indices(kept)
        self.attention_mask = self.attention_mask[kept]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ones = self.attention_mask.new_ones(tokens.shape[0], 1)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.attention_mask,
            position_ids=positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
            **self.logits_kwargs,
        )
        return out.logits[:, -1]


def _choose_strategy(model: torch.nn.Module, strategy: str, prompt_len: int, max_new_tokens: int) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if strategy == "static":
        reason = static_decode_unsupported(model, prompt_len, max_new_tokens)
        if reason is None:
            return strategy
        fallback = _choose_strategy(model, "auto", prompt_len, max_new_tokens)
        _log_once(logging.WARNING, f"sample_group: strategy 'static' cannot run ({reason}); using {fallback!r}")
        return fallback
    reason = None if strategy == "expand" else shared_prefix_unsupported(model)
    if strategy == "shared_prefix" and reason:
        raise ValueError(f"strategy: 'shared_prefix' is not available: {reason}")
    chosen = "expand" if strategy == "expand" or reason else "shared_prefix"
    if strategy == "auto":
        note = f" ({reason})" if reason else " ('static' is not the default until a GPU run shows it faster)"
        _log_once(logging.INFO, f"sample_group: {type(model).__name__}: KV reuse strategy={chosen}{note}")
    return chosen


_LOGGED: set[str] = set()


def _log_once(level: int, message: str) -> None:
    """Log ``message`` the first time only: sample_group runs once per micro-step."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.log(level, message)


def _cache_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) [B, Hkv, P, D] of a DynamicCache, across transformers cache layouts."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):  # transformers 4.4x-4.55
        return list(zip(cache.key_cache, cache.value_cache))
    raise TypeError(f"sample_group needs a transformers DynamicCache from the model, got {type(cache).__name__}")


def _new_cache(model: torch.nn.Module) -> DynamicCache:
    # Newer DynamicCache builds per-layer types (e.g. sliding windows) from the config.
    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=model.config)
    return DynamicCache()


def _last_logits_kwargs(model: torch.nn.Module) -> dict:
    """Ask the model for the last position's logits only (prefill would otherwise build [B, P, V])."""
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    logger.info("sample_group: %s.forward cannot restrict logits; prefill computes all", type(model).__name__)
    return {}


def _progress_disabled(progress: bool | None) -> bool | None:
    # tqdm reads disable=None as "off unless stderr is a TTY".
    return None if progress is None else not progress


def _check_args(model, input_ids, attention_mask, k, max_new_tokens, temperature, top_p, eos_token_id) -> list[int]:
    """Validate ``sample_group`` arguments; returns the EOS ids as a list. Raises ValueError naming the argument."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError("input_ids: expected an integer tensor [B, P]")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: empty batch or empty prompt, shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
            )
        m = attention_mask.long()
        if ((m != 0) & (m != 1)).any():
            raise ValueError("attention_mask: values must be 0 or 1")
        if (m[:, 1:] < m[:, :-1]).any():
            raise ValueError("attention_mask: prompts must be left-padded (no 0 after a 1)")
        empty = (m.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"input_ids: prompts {empty} are empty (attention_mask all 0)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: must be an int >= 1, got {k!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p: must be in (0, 1], got {top_p!r}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("model: encoder-decoder models are not supported, expected a causal LM")
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None:
        longest = input_ids.shape[1] if attention_mask is None else int(attention_mask.sum(-1).max())
        if longest > context:
            raise ValueError(f"input_ids: prompt of {longest} tokens exceeds the model's context of {context}")
        if longest + max_new_tokens > context:
            raise ValueError(
                f"max_new_tokens: {longest} prompt + {max_new_tokens} new tokens exceed "
                f"the model's context of {context}"
            )
    eos_ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    vocab = model.config.vocab_size
    if not all(isinstance(e, int) and 0 <= e < vocab for e in eos_ids):
        raise ValueError(f"eos_token_id: expected ids in [0, {vocab}), got {eos_token_id!r}")
    return eos_ids
