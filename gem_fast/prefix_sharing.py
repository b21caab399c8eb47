"""Prefix sharing in training: each prompt computed once per group, its responses packed after it.

SEGA trains on k candidates per prompt and DPO/IPO on a chosen and a rejected response per prompt;
their batches (:func:`gem_fast.data.join_prompt_and_generation`, :func:`gem_fast.data.encode_pairs`)
repeat the prompt in every row. :func:`pack_groups` turns such a batch into one row per distinct
prompt, ``[prompt, response_1, ..., response_k]``: response i keeps the positions it has in its own
row (P .. P+R_i-1, RoPE sees the same distances), the prompt attends causally to itself and
response i to the prompt and to its own earlier tokens only. Every hidden state then equals the
repeated layout's, and the gradients of all k responses flow into the one prompt computation.
The first token of each response is predicted from the prompt's last position, so that hidden
row is gathered once per response (an index with duplicates: autograd sums their gradients).

The mask reaches the HF decoder as a 4D mask, which ``transformers.masking_utils`` passes through
untouched: a boolean ``[G, 1, T, T]`` for SDPA, an additive float one for eager attention, a
FlexAttention ``BlockMask`` for ``flex_attention`` (CUDA; a FlashAttention-2 model is switched to
it, flash-attn's kernels take no such mask). :func:`resolve_prefix_sharing` decides once per run
and logs which attention runs, or why the repeated layout is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

from gem_fast.data import EncodedBatch
from gem_fast.errors import UsageError
from gem_fast.prefix_attention import modeling_module_has, shared_prefix_unsupported

__all__ = ["PREFIX_SHARING", "PackedGroups", "pack_groups", "packed_attention_mask", "packed_response_hidden",
           "prefix_sharing_unsupported", "resolve_prefix_sharing"]

logger = logging.getLogger(__name__)

PREFIX_SHARING = ("auto", "on", "off")
_MASK_KINDS = {"sdpa": "a boolean [groups, 1, T, T] mask", "eager": "an additive [groups, 1, T, T] mask",
               "flex_attention": "a FlexAttention BlockMask"}
_SHARED_OBJECTIVES = ("sega", "dpo", "ipo")


@dataclass(frozen=True)
class PackedGroups:
    """G packed rows of T tokens (right-padded) and where each response token's prediction lives.

    ``input_ids``, ``position_ids`` [G, T] int64; ``segments`` [G, T] int64: 0 on the prompt, i on
    the group's i-th response (1-based), -1 on padding. The M response tokens of the batch, in row
    order: ``hidden_rows`` [M] int64 index into the flattened [G*T] positions of the hidden state
    that predicts each (the prompt's last position for a response's first token), ``targets`` [M]
    int64 the tokens, ``source`` [M] int64 index into the repeated layout's flattened
    [N, L-1] predicted-token grid (where its loss weight and row are).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    hidden_rows: torch.Tensor
    targets: torch.Tensor
    source: torch.Tensor

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens the decoder computes."""
        return int((self.segments >= 0).sum())

    def to(self, device: torch.device | str) -> "PackedGroups":
        """The same layout on ``device``."""
        return PackedGroups(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def _row_parts(batch: EncodedBatch, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of row ``row``'s prompt tokens and of its response tokens; ValueError unless the row's
    real tokens are contiguous, prompt (at least one token) first, then response."""
    real = batch.attention_mask[row].bool()
    columns = real.nonzero().flatten()
    is_response = batch.response_mask[row, columns]
    n_prompt = int((~is_response).sum())
    contiguous = columns.numel() > 0 and int(columns[-1] - columns[0]) + 1 == columns.numel()
    if not contiguous or n_prompt == 0 or is_response[:n_prompt].any() or (batch.response_mask[row] & ~real).any():
        raise ValueError(f"prefix sharing: row {row} is not [padding] prompt response [padding] "
                         "(contiguous real tokens, at least one prompt token, the response last)")
    return columns[:n_prompt], columns[n_prompt:]


def pack_groups(batch: EncodedBatch) -> PackedGroups:
    """The packed layout of ``batch`` [N, L] (any padding side): rows whose prompt tokens are equal
    form one group, in order of first appearance, their responses in row order after the prompt.

    Runs on the CPU (one copy of the int tensors); the result is on ``batch``'s device.
    """
    device = batch.input_ids.device
    cpu = batch.to("cpu")
    length = cpu.input_ids.shape[1]
    groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for row in range(cpu.input_ids.shape[0]):
        prompt_columns, response_columns = _row_parts(cpu, row)
        groups.setdefault(tuple(cpu.input_ids[row, prompt_columns].tolist()), []).append((row, response_columns))
    width = max(len(prompt) + sum(len(c) for _, c in members) for prompt, members in groups.items())
    input_ids = torch.zeros(len(groups), width, dtype=torch.long)
    position_ids = torch.zeros(len(groups), width, dtype=torch.long)
    segments = torch.full((len(groups), width), -1, dtype=torch.long)
    hidden_rows, targets, source = [], [], []
    for g, (prompt, members) in enumerate(groups.items()):
        p = len(prompt)
        input_ids[g, :p], position_ids[g, :p], segments[g, :p] = torch.tensor(prompt), torch.arange(p), 0
        start = p
        for i, (row, columns) in enumerate(members, 1):
            end = start + len(columns)
            input_ids[g, start:end] = cpu.input_ids[row, columns]
            position_ids[g, start:end] = torch.arange(p, p + len(columns))
            segments[g, start:end] = i
            # Response token j is predicted from the packed position of token j-1; token 0 from the prompt's last.
            predicting = torch.cat([torch.tensor([p - 1]), torch.arange(start, end - 1)])[: len(columns)]
            hidden_rows.append(g * width + predicting)
            targets.append(cpu.input_ids[row, columns])
            source.append(row * (length - 1) + columns - 1)
            start = end
    return PackedGroups(input_ids, position_ids, segments, torch.cat(hidden_rows), torch.cat(targets),
                        torch.cat(source)).to(device)


def _allowed(segments: torch.Tensor) -> Callable[..., torch.Tensor]:
    """FlexAttention mask_mod of the packed layout: causal, and a key is the prompt or the query's own segment.

    Padding queries (segment -1) see the prompt and earlier padding, so no row is fully masked
    (SDPA would return NaN there); real queries never see padding.
    """
    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        key_segment = segments[b, kv]
        return (kv <= q) & ((key_segment == 0) | (key_segment == segments[b, q]))

    return mask_mod


def packed_attention_mask(packed: PackedGroups, implementation: str, dtype: torch.dtype) -> torch.Tensor | BlockMask:
    """The 4D attention mask of ``packed`` for HF attention ``implementation`` (see the module doc);
    ``dtype``: the additive mask's (eager attention)."""
    groups, width = packed.segments.shape
    mask_mod = _allowed(packed.segments)
    if implementation == "flex_attention":
        return create_block_mask(mask_mod, groups, None, width, width, device=packed.segments.device)
    allowed = create_mask(mask_mod, groups, 1, width, width, device=packed.segments.device)
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ValueError(f"prefix sharing: no packed mask for attention {implementation!r}")


def packed_response_hidden(model: torch.nn.Module, packed: PackedGroups) -> torch.Tensor:
    """[M, H] final (post-norm) hidden states predicting ``packed.targets``, from one decoder pass."""
    config = model.config
    dtype = next(model.parameters()).dtype
    out = model.base_model(
        input_ids=packed.input_ids,
        attention_mask=packed_attention_mask(packed, config._attn_implementation, dtype),
        position_ids=packed.position_ids,
        use_cache=False,
    )
    return out.last_hidden_state.flatten(0, 1)[packed.hidden_rows]


def prefix_sharing_unsupported(model: torch.nn.Module, device: torch.device) -> str | None:
    """Why ``model`` on ``device`` cannot run the packed layout (None when it can)."""
    if reason := shared_prefix_unsupported(model):  # the same limits as the sampler's shared prefix
        return reason
    if not modeling_module_has(model, "create_causal_mask"):
        return f"{type(model).__name__} does not build its mask with transformers.masking_utils"
    implementation = model.config._attn_implementation
    if implementation == "flash_attention_2" and device.type == "cuda":
        return None  # switched to flex_attention by resolve_prefix_sharing
    if implementation == "flex_attention" and device.type != "cuda":
        return "flex_attention runs compiled on CUDA only here"
    if implementation not in _MASK_KINDS:
        return f"attention {implementation!r} takes no custom 4D mask"
    return None


def resolve_prefix_sharing(mode: Literal["auto", "on", "off"], model: torch.nn.Module, objective: str,
                           device: torch.device) -> bool:
    """Whether training steps use the packed layout; logs the attention it runs with, or why not.

    ``auto``: on for SEGA, DPO and IPO where the model supports it; ``on``: :class:`UsageError` where it
    does not; ``off``: the repeated layout. A FlashAttention-2 model on CUDA is switched to
    FlexAttention here (before wrapping, compiling or sharding) because flash-attn cannot mask
    the responses from each other.
    """
    if mode not in PREFIX_SHARING:
        raise ValueError(f"prefix_sharing: expected one of {PREFIX_SHARING}, got {mode!r}")
    if mode == "off":
        return False
    if objective not in _SHARED_OBJECTIVES:
        if mode == "on":
            raise UsageError(f"--prefix_sharing on applies to {', '.join(_SHARED_OBJECTIVES)}, not {objective!r}; "
                             "pass --prefix_sharing auto or off")
        return False
    reason = prefix_sharing_unsupported(model, device)
    if reason:
        if mode == "on":
            raise UsageError(f"--prefix_sharing on is not available: {reason}; pass --prefix_sharing auto or off")
        logger.info("prefix sharing off (repeated prompts): %s", reason)
        return False
    if model.config._attn_implementation == "flash_attention_2":
        model.set_attn_implementation("flex_attention")
        logger.info("prefix sharing: attention switched from flash_attention_2 to flex_attention")
    implementation = model.config._attn_implementation
    logger.info("prefix sharing on: each group [prompt, responses...] through %s with %s",
                implementation, _MASK_KINDS[implementation])
    return True
