"""Group decoding with static shapes: every decode step is the same device work, so it can be captured.

What makes the step static (``sample_group(..., strategy="static")``):

* the prompt K/V of the prefill is kept once per prompt ``[B, Hkv, P, D]`` and read once per group of
  k rows inside the step (:func:`gem_fast.prefix_attention.shared_prefix_attention`);
* the generated K/V live in buffers ``[B*k, Hkv, max_new_tokens, D]`` allocated once per call; the step
  writes slot ``index`` with ``index_copy_`` and masks the slots not yet written;
* positions, the step counter, the sampling seed and the finished flags are device tensors; finished
  rows stay in the batch (their tokens are replaced by padding and masked), so no shape depends on
  the data;
* sampling (temperature, top-p, Gumbel-max, per-token entropy) is :func:`gem_fast.kernels.sample_tokens`,
  whose noise is a hash of (seed, step, row, column): no generator state, no host sync.

The host asks "has every row finished?" only every ``sync_every`` steps (:data:`SYNC_EVERY`). On CUDA
the first decode step runs eagerly, the second on a side stream (the warm-up before capture), then the
step is captured into one CUDA graph (per call, so one graph per batch shape) which every later step
replays; a step that cannot be captured runs eagerly with the reason logged.

Attention is routed through transformers' ``AttentionInterface``: the model is called without a
cache object and the registered function receives this call's :class:`StaticDecoder` as a keyword
argument, which HF models pass through to their attention functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from gem_fast.kernels import sample_tokens
from gem_fast.prefix_attention import modeling_module_has, shared_prefix_attention

try:  # transformers >= 4.48
    from transformers.modeling_utils import AttentionInterface
except ImportError:  # pragma: no cover - depends on the installed transformers
    AttentionInterface = None

logger = logging.getLogger(__name__)

STATIC_ATTENTION = "gem_fast_static_decode"
# One host sync per 8 steps: after the last row finishes, at most 7 steps of the batch are wasted
# (<= 11 % of a 64-token call), and a launch-bound step queue is drained once per 8 steps, not every step.
SYNC_EVERY = 8


def static_decode_unsupported(model: torch.nn.Module, prompt_len: int, max_new_tokens: int) -> str | None:
    """Why :class:`StaticDecoder` cannot run ``model`` on prompts of ``prompt_len`` (padded) tokens (None: it can)."""
    if AttentionInterface is None:
        return "this transformers has no AttentionInterface"
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(layer_types)} include layers that are not attention (hybrid/recurrent)"
    window = getattr(config, "sliding_window", None)
    # Some families (Mistral) pass config.sliding_window to every layer whatever their layer type says.
    sliding = "sliding_attention" in layer_types or (window is not None and getattr(config, "use_sliding_window", True))
    # A window longer than the whole call is full attention; the prefill cache then keeps every prompt key.
    if sliding and (window is None or prompt_len + max_new_tokens >= window):
        return f"sliding-window attention (window {window}, {prompt_len} prompt + {max_new_tokens} new tokens)"
    # Modeling files that dispatch attention through the interface import ALL_ATTENTION_FUNCTIONS.
    if not modeling_module_has(model, "ALL_ATTENTION_FUNCTIONS"):
        return f"{type(model).__name__} does not dispatch attention through AttentionInterface"
    return None


class StaticDecoder:
    """Decode state of one ``sample_group`` call; :meth:`step` is the capturable decode step.

    prefix_kv      per layer (keys, values) [B, Hkv, P, D] of the prefill.
    prefix_mask    [B, P] bool, True for real prompt tokens.
    start          [B] int64: position of generated token 0 of each prompt (its number of real tokens).
    eos            [E] int64 EOS ids (E = 0: rows never finish).
    seed           [] int64: the sampling noise seed (drawn once from the caller's generator).
    Outputs, filled in place: ``sequences`` [N, S] int64 (``pad_token_id`` after EOS), ``token_entropy``
    [N, S] float32 (0 where masked), ``mask`` [N, S] bool, with N = B*k rows (prompt-major), S = max_new_tokens.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]],
        prefix_mask: torch.Tensor,
        start: torch.Tensor,
        *,
        k: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        eos: torch.Tensor,
        pad_token_id: int,
        seed: torch.Tensor,
        backend: str,
        logits_kwargs: dict,
    ):
        batch, _, prompt_len, _ = prefix_kv[0][0].shape
        if any(key.shape[2] != prompt_len for key, _ in prefix_kv):
            raise RuntimeError(
                f"static decode: the prefill cache of {type(model).__name__} does not hold every prompt key"
            )
        n, device = batch * k, prefix_mask.device
        self.model, self.k, self.logits_kwargs = model, k, logits_kwargs
        self.temperature, self.top_p, self.backend = temperature, top_p, backend
        self.prefix_keys = [key for key, _ in prefix_kv]
        self.prefix_values = [value for _, value in prefix_kv]
        self.prefix_mask = prefix_mask
        self.suffix_keys = [key.new_zeros(n, key.shape[1], max_new_tokens, key.shape[3]) for key in self.prefix_keys]
        self.suffix_values = [v.new_zeros(n, v.shape[1], max_new_tokens, v.shape[3]) for v in self.prefix_values]
        self.slots = torch.arange(max_new_tokens, device=device)
        self.start = start.repeat_interleave(k)
        self.eos, self.pad_token_id, self.seed = eos, pad_token_id, seed
        self.index = torch.zeros((), dtype=torch.long, device=device)  # generated index of ``tokens``
        self.tokens = torch.zeros(n, dtype=torch.long, device=device)  # the last sampled token of each row
        self.finished = torch.zeros(n, dtype=torch.bool, device=device)
        self.sequences = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.token_entropy = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)
        self.mask = torch.zeros((n, max_new_tokens), dtype=torch.bool, device=device)
        self.attention_calls = 0
        self.steps_run = 0  # decode steps (model calls) run by :meth:`run`
        if STATIC_ATTENTION not in AttentionInterface._global_mapping:
            AttentionInterface.register(STATIC_ATTENTION, _static_attention_forward)

    @property
    def prompt_kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.prefix_keys + self.prefix_values)

    def sample(self, logits: torch.Tensor) -> None:
        """Draw generated token ``index`` of every row from ``logits`` [N, V] and record it (finished rows: padding)."""
        tokens, entropy = sample_tokens(
            logits, self.seed, self.index, temperature=self.temperature, top_p=self.top_p, backend=self.backend
        )
        alive = ~self.finished
        tokens = torch.where(alive, tokens, self.pad_token_id)
        column = self.index.view(1)
        self.sequences.index_copy_(1, column, tokens[:, None])
        self.token_entropy.index_copy_(1, column, torch.where(alive, entropy, 0.0)[:, None])
        self.mask.index_copy_(1, column, alive[:, None])
        self.finished |= (tokens[:, None] == self.eos).any(-1)
        self.tokens.copy_(tokens)

    def step(self) -> None:
        """Feed every row's last token, then sample the next one: fixed shapes, in place, no host sync."""
        config = self.model.config
        previous, config._attn_implementation = config._attn_implementation, STATIC_ATTENTION
        try:
            logits = self.model(
                input_ids=self.tokens[:, None],
                position_ids=(self.start + self.index)[:, None],
                use_cache=False,
                static_decoder=self,
                **self.logits_kwargs,
            ).logits[:, -1]
        finally:
            config._attn_implementation = previous
        self.index += 1
        self.sample(logits)

    def attend(self, module: torch.nn.Module, query, key, value, scaling: float | None, softcap: float | None):
        """One layer's attention: store the new K/V [N, Hkv, 1, D] in slot ``index``, then attend to the prompt
        and the slots <= ``index``."""
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise RuntimeError(f"static decode: attention module {type(module).__name__} has no layer_idx")
        if not torch.compiler.is_compiling():  # a Python counter in a compiled step would recompile it each call
            self.attention_calls += 1
        slot = self.index.view(1)
        self.suffix_keys[layer].index_copy_(2, slot, key)
        self.suffix_values[layer].index_copy_(2, slot, value)
        out = shared_prefix_attention(
            query,
            self.prefix_keys[layer],
            self.prefix_values[layer],
            self.suffix_keys[layer],
            self.suffix_values[layer],
            prefix_mask=self.prefix_mask,
            suffix_mask=self.slots <= self.index,
            scale=scaling,
            softcap=softcap,
        )
        return out.transpose(1, 2).contiguous()  # HF attention functions return [N, L, Hq, D]

    def run(
        self, first_logits: torch.Tensor, *, sync_every: int = SYNC_EVERY, on_step: Callable[[], None] = lambda: None
    ) -> int:
        """Decode from the prefill's ``first_logits`` [B, V]; returns the number of steps T with a valid token.

        Stops early (checked on the host every ``sync_every`` steps) once every row has finished.
        """
        self.sample(first_logits.repeat_interleave(self.k, dim=0))  # the k rows of a prompt share step 0
        on_step()
        max_new_tokens = self.slots.numel()
        step = self.step
        for index in range(1, max_new_tokens):
            if self.eos.numel() and index % sync_every == 0 and bool(self.finished.all()):
                break
            if index == 2 and self.tokens.is_cuda:
                step = graphed(self.step)  # does this step's work, replays the captured graph after
            else:
                step()
            self.steps_run += 1
            on_step()
            if index == 1:
                self._check_all_layers_routed()
        # One sync: steps after every row finished hold padding only and are cut, as the eager paths do.
        return int(self.mask.any(0).sum())

    def _check_all_layers_routed(self) -> None:
        layers = len(self.prefix_keys)
        if self.attention_calls != layers:
            raise RuntimeError(
                f"static decode: {self.attention_calls} of {layers} attention layers went through transformers' "
                f"AttentionInterface for {type(self.model).__name__}; use strategy='expand'"
            )


def graphed(step: Callable[[], None]) -> Callable[[], None]:
    """Run ``step`` once on a side stream (the warm-up, real work), capture it into a CUDA graph, return the replay.

    Each call of the returned callable does ``step``'s work once. When capture fails it logs why and
    returns ``step`` itself (eager).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()  # recorded, not run: the first replay does this step's work
    except RuntimeError as error:
        logger.warning("static decode: CUDA graph capture failed, decoding eagerly: %s", error)
        return step
    return graph.replay


def _static_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, static_decoder=None, **kwargs
):
    """Entry registered in transformers' AttentionInterface. The mask is ignored: the decoder holds the prompt
    mask and the filled slots; a sliding window is longer than the call (checked by static_decode_unsupported)."""
    if static_decoder is None:
        raise RuntimeError(f"attn_implementation {STATIC_ATTENTION!r} is only valid inside StaticDecoder.step")
    return static_decoder.attend(module, query, key, value, scaling, softcap), None
