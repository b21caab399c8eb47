"""Training engine for SFT and SEGA: FSDP2, mixed precision, accumulation, clipping, LR schedule, resume.

One loop for every objective (torchtitan's shape): each optimizer step builds its micro-batches
(``sft_micro_batches``, ``sega_micro_batches`` or ``pair_micro_batches``) as rows plus per-token
loss weights (SFT, SEGA) or reference log-probs (DPO, IPO), and :class:`PolicyLoss` turns them
into a loss with :mod:`gem_fast.kernels` from the final hidden states and the LM head, inside
the FSDP root's forward (so ``lm_head.weight`` is the gathered tensor, and no
``[tokens, vocab]`` logits exist).

Launch::

    python scripts/train_sft.py --train_jsonl pairs.jsonl --out_dir outputs/sft     # 1 process
    torchrun --nproc_per_node 8 scripts/train_sft.py --config configs/sft_demo.yaml  # FSDP2
    accelerate launch --num_processes 8 scripts/train_sft.py --config ...  # the same: accelerate
    # exports RANK/WORLD_SIZE/MASTER_ADDR like torchrun; do not enable its own FSDP plugin.

Without ``RANK`` in the environment no process group is created and the model is not sharded
(CPU, or one GPU with bf16 autocast). Under torchrun: NCCL on CUDA, gloo on CPU; each decoder
layer and the root are ``fully_shard``-ed; on CUDA parameters are gathered in bf16 and
gradients reduced in fp32 while the optimizer steps fp32 master shards. Global batch per
optimizer step = ``batch_size × grad_accum × world_size`` rows (SFT) or prompts (SEGA).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import time
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from gem_fast.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from gem_fast.data import (EncodedBatch, PreferencePair, encode_pairs, encode_prompt_responses, encode_prompts,
                           join_prompt_and_generation, load_preference_jsonl)
from gem_fast.kernels import resolve_backend, weighted_logprob_loss
from gem_fast.integrations import output_head
from gem_fast.logprobs import IGNORE_INDEX, PairLogprobs, pair_logprobs, response_hidden, response_targets
from gem_fast.models import apply_liger_layers, load_model_and_tokenizer, use_liger_layers
from gem_fast.sampling import GroupSample, sample_group
from gem_fast.scoring import entropy_score, final_mask_from_marker, final_mask_last_fraction
from gem_fast.sega import pair_objective_loss, sega_advantages

__all__ = ["TrainConfig", "TrainResult", "NonFiniteLossError", "PolicyLoss", "MicroBatch", "parallelize", "lr_factor",
           "sft_micro_batches", "sega_micro_batches", "pair_micro_batches", "reference_logprobs", "parse_config",
           "train", "main"]

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every knob of a run; scripts fill it from YAML then CLI (see ``scripts/train_*.py``)."""

    train_jsonl: str = ""
    out_dir: str = "outputs/run"
    model_name_or_path: str | None = None  # None: the embedded SmolLM2 GGUF
    objective: Literal["sft", "sega", "dpo", "ipo"] = "sft"
    epochs: int = 1
    max_steps: int = 0  # > 0 caps the optimizer steps
    lr: float = 1e-5
    batch_size: int = 1  # rows (SFT) or prompts (SEGA) per rank per micro-step
    grad_accum: int = 1
    max_length: int = 512
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    seed: int = 0
    save_every: int = 0  # optimizer steps between checkpoints; 0: only on SIGTERM/SIGINT
    keep_checkpoints: int = 2
    resume: bool = False
    activation_checkpointing: bool = False
    chat_template: bool = False
    kernel_backend: Literal["auto", "naive", "torch", "triton"] = "auto"
    # Liger-Kernel RMSNorm/RoPE/SwiGLU in the decoder (never its cross-entropy); auto: on with CUDA and liger-kernel
    liger_layers: Literal["auto", "on", "off"] = "auto"
    compile_layers: bool = False  # torch.compile each decoder layer (after activation checkpointing, before FSDP)
    trust_remote_code: bool = False
    export_hf: bool = True
    progress: bool = True
    # DPO/IPO: β of the implicit reward β·log(π/π_ref); SEGA: softmax reward temperature, r = softmax(S / β)
    beta: float = 1.0
    length_normalize: bool = False  # DPO/IPO: per-token mean log-probs instead of sums
    # SEGA (GEM Eq. 1 and 2)
    k: int = 4
    lambda_fork: float = 0.4
    top_m: float = 0.1
    reward_mapping: Literal["identity", "softmax"] = "softmax"
    final_span: Literal["last_fraction", "marker"] = "last_fraction"  # which tokens Eq. 1 scores as the answer
    final_fraction: float = 0.25  # "last_fraction": that fraction of a candidate's last tokens
    gen_max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 0.95


@dataclass(frozen=True)
class TrainResult:
    """What a run did: steps completed in total, per-step global losses of this call, last checkpoint."""

    steps_done: int
    losses: list[float]
    checkpoint: Path | None
    stopped_by_signal: int | None  # the signal number that stopped the run early, else None


class NonFiniteLossError(FloatingPointError):
    """A step's loss or gradient norm was NaN/inf; raised before the optimizer step touches the weights."""


@dataclass(frozen=True)
class MicroBatch:
    """Rows of one micro-step: loss weights [N, L-1] float32 per predicted token (SFT, SEGA), or the
    pairs' reference log-probs (DPO, IPO; rows chosen-then-rejected) and the factor on their mean loss."""

    batch: EncodedBatch
    token_weights: torch.Tensor | None = None
    reference: PairLogprobs | None = None
    loss_scale: float = 1.0


StepBatches = tuple[list[MicroBatch], dict[str, torch.Tensor]]
"""A step's micro-batches and this rank's step statistics (0-dim tensors, logged as the mean over ranks)."""


@dataclass(frozen=True)
class _Dist:
    rank: int
    world: int
    device: torch.device
    sharded: bool  # a process group exists and the model is fully_shard-ed


class PolicyLoss(nn.Module):
    """Root module: ``forward`` returns ``-Σ_t w_t·log π(y_t)`` (float32 scalar) for a micro-batch.

    Computing the loss here, not in a helper outside ``forward``, keeps FSDP2's gathered
    ``lm_head.weight`` in scope (a side method would see the sharded DTensor).
    """

    def __init__(self, model: nn.Module, *, backend: str = "auto", objective: str = "sft", beta: float = 1.0,
                 length_normalize: bool = False) -> None:
        super().__init__()
        self.model = model
        self.backend = backend
        self.objective = objective
        self.beta = beta
        self.length_normalize = length_normalize

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
        token_weights: torch.Tensor | None = None, reference: PairLogprobs | None = None,
    ) -> torch.Tensor:
        """input_ids/attention_mask [N, L] int, response_mask [N, L] bool; token_weights [N, L-1] float32
        (SFT, SEGA), or ``reference`` log-probs of the N/2 pairs (DPO/IPO: mean loss over the pairs)."""
        batch = EncodedBatch(input_ids, attention_mask, response_mask)
        if self.objective in ("dpo", "ipo"):
            return pair_objective_loss(self.objective, self.model, batch, reference, beta=self.beta,
                                       length_normalize=self.length_normalize, backend=self.backend)
        head = output_head(self.model)
        hidden = response_hidden(self.model, batch)
        return weighted_logprob_loss(
            hidden, head.weight, response_targets(batch), token_weights, bias=head.bias,
            logit_scale=head.logit_scale, logit_softcap=head.logit_softcap, ignore_index=IGNORE_INDEX,
            backend=self.backend, drop_ignored_rows=True,
        )

    def sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> GroupSample:
        """:func:`gem_fast.sampling.sample_group` on the wrapped model; registered as an FSDP forward method."""
        return sample_group(self.model, input_ids, attention_mask, **kwargs)

    def pair_logprobs(self, tokenizer: Any, pairs: list[PreferencePair], **kwargs: Any) -> PairLogprobs:
        """:func:`gem_fast.logprobs.pair_logprobs` of the wrapped model (no grad); an FSDP forward method."""
        return pair_logprobs(self.model, tokenizer, pairs, backend=self.backend, **kwargs)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no base_model.layers ModuleList to shard/checkpoint per layer")
    return layers


def parallelize(
    policy: PolicyLoss, *, activation_checkpointing: bool, sharded: bool, device: torch.device,
    compile_layers: bool = False,
) -> PolicyLoss:
    """Per-layer activation checkpointing, then torch.compile per layer, then FSDP2 on every decoder
    layer and the root (if ``sharded``): torchtitan's order.

    Embeddings, final norm and LM head stay in the root unit, so tied input/output embeddings
    remain one parameter. Returns ``policy`` (modified in place).
    """
    layers = _decoder_layers(policy.model)
    if activation_checkpointing:
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    if compile_layers:
        # In place (nn.Module.compile), not a torch.compile wrapper module: parameter names, hence
        # checkpoints and the HF export, stay the eager model's. Layers share code, so one graph serves all.
        for layer in layers:
            layer.compile()
        logger.info("torch.compile (inductor) on each of %d decoder layers; the first step compiles", len(layers))
    if not sharded:
        return policy.to(device)
    on_cuda = device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if on_cuda else None, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    # The root's inputs include float32 loss weights: casting them to bf16 would round them.
    fully_shard(policy, mp_policy=MixedPrecisionPolicy(mp.param_dtype, mp.reduce_dtype, cast_forward_inputs=False))
    for method in ("sample", "pair_logprobs"):
        register_fsdp_forward_method(policy, method)
    return policy


def lr_factor(step: int, *, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup, then decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def _step_rows(step: int, micro: int, n_rows: int, cfg: TrainConfig, d: _Dist) -> list[int]:
    """Indices of this rank's rows in micro-step ``micro`` of ``step``: a seeded permutation per epoch."""
    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    steps_per_epoch = n_rows // global_batch
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed + epoch))
    start = within * global_batch + (micro * d.world + d.rank) * cfg.batch_size
    return order[start : start + cfg.batch_size].tolist()


def _all_reduce_sum(x: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.sharded:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def sft_micro_batches(
    pairs: list[PreferencePair], tokenizer: Any, step: int, cfg: TrainConfig, d: _Dist
) -> StepBatches:
    """SFT on the chosen responses: weights ``1/N`` per response token, N counted over the global batch.

    FSDP averages gradients over ranks, so the weights carry a factor ``world`` to make that
    average the gradient of the global token mean.
    """
    batches = []
    for micro in range(cfg.grad_accum):
        rows = [pairs[i] for i in _step_rows(step, micro, len(pairs), cfg, d)]
        batches.append(encode_prompt_responses(
            tokenizer, [p.prompt for p in rows], [p.chosen for p in rows],
            max_length=cfg.max_length, chat_template=cfg.chat_template, padding_side="right",
        ))
    local_tokens = sum(b.response_mask[:, 1:].sum() for b in batches).to(torch.float32).to(d.device)
    tokens = _all_reduce_sum(local_tokens.clone(), d)
    scale = d.world / tokens.clamp(min=1)
    micro = [MicroBatch(b.to(d.device), b.response_mask[:, 1:].to(d.device) * scale) for b in batches]
    return micro, {"tokens_per_rank": local_tokens}


def pair_micro_batches(
    pairs: list[PreferencePair], reference: PairLogprobs, tokenizer: Any, step: int, cfg: TrainConfig, d: _Dist
) -> StepBatches:
    """DPO/IPO: each micro-step's pairs (chosen rows, then rejected) with their reference log-probs.

    Every micro-step holds ``batch_size`` pairs, so the global mean over pairs is the mean of the
    micro-step means: each is scaled by ``1/grad_accum`` and FSDP averages over ranks.
    """
    micro = []
    for m in range(cfg.grad_accum):
        index = _step_rows(step, m, len(pairs), cfg, d)
        rows = [pairs[i] for i in index]
        batch = encode_pairs(tokenizer, rows, max_length=cfg.max_length, chat_template=cfg.chat_template)
        ref = reference.select(torch.tensor(index))
        micro.append(MicroBatch(batch.to(d.device), reference=ref, loss_scale=1 / cfg.grad_accum))
    return micro, {}


def sega_micro_batches(
    policy: PolicyLoss, pairs: list[PreferencePair], tokenizer: Any, step: int, cfg: TrainConfig, d: _Dist
) -> StepBatches:
    """SEGA (Eq. 2): k sampled candidates per prompt, Eq. 1 scores, group advantages as row weights.

    A candidate row's tokens all weigh ``A_i · world / B_global`` ("group" normalisation, the
    mean over the step's prompts). Sampling draws from a generator seeded by (seed, step, rank),
    so a resumed run samples what the uninterrupted run did.
    """
    generator = torch.Generator(d.device).manual_seed(cfg.seed * 1_000_003 + step * 1009 + d.rank)
    prompts_global = cfg.batch_size * cfg.grad_accum * d.world
    micro, stats = [], []
    policy.eval()
    for m in range(cfg.grad_accum):
        rows = [pairs[i] for i in _step_rows(step, m, len(pairs), cfg, d)]
        prompt_ids, prompt_mask = (t.to(d.device) for t in encode_prompts(
            tokenizer, [p.prompt for p in rows], max_length=cfg.max_length, chat_template=cfg.chat_template))
        out = policy.sample(
            prompt_ids, prompt_mask, k=cfg.k, max_new_tokens=cfg.gen_max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, generator=generator, progress=False,
        )
        if cfg.final_span == "marker":  # tokens after "Answer:" / "####"; none (score -inf) without a marker
            final = final_mask_from_marker(out.sequences, out.mask, tokenizer)
        else:
            final = final_mask_last_fraction(out.mask, cfg.final_fraction)
        scores = entropy_score(
            out.token_entropy, final, out.mask,
            lambda_fork=cfg.lambda_fork, top_m=cfg.top_m,
        ).view(len(rows), cfg.k)
        adv = sega_advantages(scores, mapping=cfg.reward_mapping, temperature=cfg.beta)
        batch = join_prompt_and_generation(prompt_ids, prompt_mask, out.sequences, out.mask)
        weights = (adv.reshape(-1, 1) * (d.world / prompts_global)).expand(-1, batch.input_ids.shape[1] - 1)
        micro.append(MicroBatch(batch, weights.contiguous()))
        finite = torch.isfinite(scores)
        valid = out.mask.float()
        stats.append(torch.stack([
            scores.masked_fill(~finite, 0).sum() / finite.sum().clamp(min=1),
            1 - finite.float().mean(),
            adv.abs().mean(),
            (out.token_entropy * valid).sum() / valid.sum().clamp(min=1),
            valid.sum(-1).mean(),
        ]))
    policy.train()
    names = ("score_mean", "no_answer_frac", "adv_abs_mean", "entropy_mean", "gen_len_mean")
    return micro, dict(zip(names, torch.stack(stats).mean(0)))


def reference_logprobs(
    policy: PolicyLoss, pairs: list[PreferencePair], tokenizer: Any, cfg: TrainConfig, d: _Dist, cache: Path
) -> PairLogprobs:
    """DPO/IPO π_ref log-probs of every pair from the policy's current (initial) weights, on CPU.

    Rank r scores pairs r, r + world, ... on its device and the slices are all-gathered. The
    table goes to ``cache`` (safetensors, written atomically by rank 0); a resumed run
    (``cfg.resume``) reads it instead of scoring the file again when it was made from the same
    data file contents, model path and tokenisation. Rank 0 decides for all ranks, so they run
    the same collectives.
    """
    key = {"train_jsonl_sha256": hashlib.sha256(Path(cfg.train_jsonl).read_bytes()).hexdigest(),
           "pairs": str(len(pairs)), "model": str(cfg.model_name_or_path), "max_length": str(cfg.max_length),
           "chat_template": str(cfg.chat_template)}
    names = ("chosen", "rejected", "chosen_tokens", "rejected_tokens")
    hit = False
    if cfg.resume and d.rank == 0 and cache.is_file():
        with safe_open(cache, "pt") as f:
            hit = f.metadata() == key
        if not hit:
            logger.info("%s was computed for other data or settings; scoring the reference again", cache)
    if d.sharded:
        flag = torch.tensor(float(hit), device=d.device)
        dist.broadcast(flag, src=0)
        hit = bool(flag.item())
    if hit:
        logger.info("reference log-probs read from %s", cache)
        with safe_open(cache, "pt") as f:
            return PairLogprobs(*(f.get_tensor(n) for n in names))
    mine = pairs[d.rank :: d.world]
    per_rank = math.ceil(len(pairs) / d.world)
    # Every rank must run as many FSDP forwards as the others: pad the slice with a repeated pair.
    mine = mine + [pairs[0]] * (per_rank - len(mine))
    policy.eval()
    local = policy.pair_logprobs(tokenizer, mine, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                 chat_template=cfg.chat_template)
    policy.train()
    columns = []
    for name in names:
        value = getattr(local, name).to(d.device)
        if d.sharded:
            parts = [torch.empty_like(value) for _ in range(d.world)]
            dist.all_gather(parts, value)
            value = torch.stack(parts, dim=1)  # [per_rank, world]: row j, column r is pair j·world + r
        columns.append(value.reshape(-1)[: len(pairs)].cpu())
    table = PairLogprobs(*columns)
    if d.rank == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(cache.name + ".tmp")
        save_file(dict(zip(names, columns)), partial, metadata=key)
        os.replace(partial, cache)
    return table


def _init_dist() -> tuple[_Dist, bool]:
    """Process group from torchrun's environment (if any); returns it and whether this call created it."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ and not dist.is_initialized():
        return _Dist(0, 1, torch.device("cuda" if cuda else "cpu"), sharded=False), False
    created = not dist.is_initialized()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if created:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return _Dist(dist.get_rank(), dist.get_world_size(), device, sharded=True), created


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, int]]:
    """Record SIGTERM/SIGINT instead of dying mid-step; the loop checkpoints and returns at the step end."""
    received: dict[str, int] = {}
    def record(signum: int, _frame: Any) -> None:
        received.setdefault("signal", signum)

    previous = {s: signal.signal(s, record) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):  # sharded grads give a partial norm; reduce it over ranks
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


SEGA_FIELDS = ("k", "lambda_fork", "top_m", "reward_mapping", "final_span", "final_fraction",
               "gen_max_new_tokens", "temperature", "top_p")
PAIR_FIELDS = ("length_normalize",)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _arg_spec(hint: Any) -> dict[str, Any]:
    """argparse keywords for a TrainConfig field's type (also used to coerce YAML strings such as 1e-5)."""
    if typing.get_origin(hint) is Literal:
        return {"choices": typing.get_args(hint)}
    if hint is bool:
        return {"type": _parse_bool, "nargs": "?", "const": True}
    if hint in (int, float):
        return {"type": hint}
    return {"type": str}  # str and str | None


def parse_config(argv: list[str] | None, *, objective: str, description: str) -> TrainConfig:
    """TrainConfig from ``--config file.yaml`` and then CLI flags (a flag given wins over YAML).

    Every field is a ``--flag`` (``--resume`` alone means true). ``objective`` "sega" fixes the
    objective and adds the SEGA knobs; otherwise it is the default of ``--objective`` (sft, dpo,
    ipo). Unknown YAML keys stop with the file name.
    """
    hints = typing.get_type_hints(TrainConfig)
    sega = objective == "sega"
    hidden = ("objective", *PAIR_FIELDS) if sega else SEGA_FIELDS
    names = [f.name for f in fields(TrainConfig) if f.name not in hidden]
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of TrainConfig fields")
    specs = {name: _arg_spec(hints[name]) for name in names}
    if "objective" in specs:
        specs["objective"]["choices"] = ("sft", "dpo", "ipo")
    for name, spec in specs.items():
        parser.add_argument(f"--{name}", **spec)
    cli = vars(parser.parse_args(argv))
    values: dict[str, Any] = {"objective": objective}
    if "config" in cli:
        path = cli.pop("config")
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if unknown := sorted(set(loaded) - set(names)):
            parser.error(f"{path}: unknown keys {unknown} for {objective}")
        for name, value in loaded.items():
            spec = specs[name]
            if isinstance(value, str) and spec.get("type") in (int, float, _parse_bool):
                value = spec["type"](value)
            if "choices" in spec and value not in spec["choices"]:
                parser.error(f"{path}: {name} must be one of {spec['choices']}, got {value!r}")
            values[name] = value
    values.update(cli)
    return TrainConfig(**values)


def _build(model: nn.Module, cfg: TrainConfig, d: _Dist, global_batch: int, total_steps: int
           ) -> tuple[PolicyLoss, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Liger layers into ``model`` (per ``cfg.liger_layers``), then wrap, compile and shard it; AdamW on its
    fp32 (master) parameters; warmup + decay schedule."""
    backend = resolve_backend(cfg.kernel_backend, d.device)
    liger = use_liger_layers(cfg.liger_layers, d.device, model.config.model_type)
    if liger:
        apply_liger_layers(model)
    logger.info(
        "rank %d/%d on %s, sharded=%s, kernel backend %s, attention %s, Liger layers %s, compiled layers %s, "
        "global batch %d, %d steps", d.rank, d.world, d.device, d.sharded, backend,
        model.config._attn_implementation, "on" if liger else "off", "on" if cfg.compile_layers else "off",
        global_batch, total_steps,
    )
    policy = PolicyLoss(
        model, backend=backend, objective=cfg.objective, beta=cfg.beta, length_normalize=cfg.length_normalize
    )
    parallelize(policy, activation_checkpointing=cfg.activation_checkpointing, sharded=d.sharded, device=d.device,
                compile_layers=cfg.compile_layers)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, warmup=cfg.warmup_steps, total=total_steps, decay=cfg.lr_decay, min_ratio=cfg.min_lr_ratio))
    return policy, optimizer, schedule


def _open_metrics(path: Path, start: int) -> typing.TextIO:
    """Append handle on the metrics JSONL, minus records past ``start`` (steps a hard kill lost)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start]
        path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def train(
    cfg: TrainConfig, *, on_step: Callable[[int, dict[str, float], PolicyLoss], None] | None = None
) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; ``on_step(step, record, policy)`` runs after each step.

    Data is validated before the model loads. Raises :class:`NonFiniteLossError` on a NaN/inf
    loss or gradient norm, before the optimizer step and without writing a checkpoint.
    """
    pairs = load_preference_jsonl(cfg.train_jsonl)  # ValueError with file:line on bad rows
    d, created_pg = _init_dist()
    try:
        global_batch = cfg.batch_size * cfg.grad_accum * d.world
        steps_per_epoch = len(pairs) // global_batch
        if steps_per_epoch == 0:
            raise ValueError(f"{cfg.train_jsonl}: {len(pairs)} pairs, fewer than one global batch of {global_batch}")
        total_steps = cfg.epochs * steps_per_epoch
        if cfg.max_steps > 0:
            total_steps = min(total_steps, cfg.max_steps)
        out_dir, ckpt_root = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
        if not cfg.resume and latest_checkpoint(ckpt_root) is not None:
            # A fresh run would interleave its checkpoints with the old run's; --resume picks the newest.
            raise ValueError(f"{ckpt_root} holds checkpoints of an earlier run: pass --resume (resume=True) or another out_dir")
        model, tokenizer = load_model_and_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        policy, optimizer, schedule = _build(model.train(), cfg, d, global_batch, total_steps)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" and not d.sharded
                    else contextlib.nullcontext())
        reference = None
        if cfg.objective in ("dpo", "ipo"):
            # The initial weights are the reference, also on resume: scored before the checkpoint loads.
            with autocast:
                reference = reference_logprobs(
                    policy, pairs, tokenizer, cfg, d, out_dir / "reference_logprobs.safetensors")
        params = [p for p in policy.parameters() if p.requires_grad]
        start, last_ckpt = 0, None
        if cfg.resume and (last_ckpt := latest_checkpoint(ckpt_root)) is not None:
            state = load_checkpoint(last_ckpt, policy, optimizer)
            if state["global_batch"] != global_batch:
                raise ValueError(f"{last_ckpt}: written with global batch {state['global_batch']}, now {global_batch}")
            schedule.load_state_dict(state["scheduler"])
            start = state["step"]
        elif cfg.resume:
            logger.info("resume: no checkpoint under %s, starting at step 0", ckpt_root)
        if d.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
        metrics = _open_metrics(out_dir / "metrics.jsonl", start) if d.rank == 0 else None
        bar = tqdm(total=total_steps, initial=start, desc=cfg.objective, disable=d.rank != 0 or not cfg.progress)
        losses: list[float] = []
        stopped = None
        with _stop_on_signals() as received:
            for step in range(start, total_steps):
                t0 = time.perf_counter()
                if cfg.objective == "sega":
                    micro, stats = sega_micro_batches(policy, pairs, tokenizer, step, cfg, d)
                elif reference is not None:
                    micro, stats = pair_micro_batches(pairs, reference, tokenizer, step, cfg, d)
                else:
                    micro, stats = sft_micro_batches(pairs, tokenizer, step, cfg, d)
                loss_sum = torch.zeros((), device=d.device)
                for mb in micro:
                    with autocast:
                        loss = policy(mb.batch.input_ids, mb.batch.attention_mask, mb.batch.response_mask,
                                      mb.token_weights, mb.reference) * mb.loss_scale
                    loss.backward()
                    loss_sum += loss.detach()
                grad_norm = _clip_grad_norm(params, cfg.max_grad_norm)
                # Besides one per micro-step (the kept rows of the loss), the step's only host sync, at its
                # boundary: one all-reduce of loss, stop request and stats, read back with the grad norm.
                packed = torch.stack([loss_sum / d.world, torch.tensor(float(bool(received)), device=d.device),
                                      *[v.to(d.device, torch.float32) for v in stats.values()]])
                *packed, norm = torch.cat([_all_reduce_sum(packed, d), grad_norm.reshape(1).to(packed)]).tolist()
                record = {"step": step + 1, "epoch": step // steps_per_epoch, "loss": packed[0],
                          "grad_norm": norm, "lr": schedule.get_last_lr()[0],
                          **{k: v / d.world for k, v in zip(stats, packed[2:])}}
                if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
                    raise NonFiniteLossError(
                        f"step {step + 1}: loss {record['loss']}, grad norm {record['grad_norm']}; "
                        f"last checkpoint {latest_checkpoint(ckpt_root)} left as it was"
                    )
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                record["step_time_s"] = time.perf_counter() - t0
                losses.append(record["loss"])
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    bar.update(1)
                    bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in record.items()))
                done = step + 1
                stop = packed[1] > 0
                if stop or (cfg.save_every and done % cfg.save_every == 0):
                    trainer_state = {"step": done, "samples_seen": done * global_batch, "global_batch": global_batch,
                                     "scheduler": schedule.state_dict()}
                    last_ckpt = save_checkpoint(
                        ckpt_root, done, policy, optimizer, trainer_state, keep_last=cfg.keep_checkpoints
                    )
                if on_step is not None:
                    on_step(done, record, policy)
                if stop:
                    stopped = received.get("signal", signal.SIGTERM)  # another rank may have received it
                    break
        bar.close()
        if metrics is not None:
            metrics.close()
        if stopped is None and cfg.export_hf:
            export_hf(model, tokenizer, out_dir)
        return TrainResult(start + len(losses), losses, last_ckpt, stopped)
    finally:
        if created_pg:
            dist.destroy_process_group()


def main(argv: list[str] | None, *, objective: str, description: str) -> int:
    """Entry point of ``scripts/train_*.py``: logging, config, run; exit code 128 + signal if stopped early."""
    # Under torchrun only rank 0 narrates; the others report warnings and errors.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train(parse_config(argv, objective=objective, description=description))
    return 128 + result.stopped_by_signal if result.stopped_by_signal else 0
