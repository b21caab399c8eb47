"""Per-rank peak memory of a ``gem_fast.train`` step, from the model's shape: naive loss vs fused.

The step is a :class:`~gem_fast.plan.workload.Setup` (rows, lengths, loss path, device, sharding,
SEGA sampling). An analytic model, term by term, of what the engine allocates (every size in bytes):

* persistent: fp32 master parameters and AdamW's two fp32 states, sharded ``÷ world`` under FSDP2;
  fp32 gradients (``÷ world``) from the end of backward to ``zero_grad(set_to_none=True)``;
* FSDP2 (``world > 1``): the root unit (embeddings, final norm, LM head) stays gathered for the
  whole forward and backward, decoder layers are gathered one at a time (plus the prefetched next
  one and an all-gather buffer), layer gradients are reduce-scattered through fp32 buffers;
  one GPU without FSDP: fp32 parameters plus the bf16 copies autocast caches for the matmuls;
* activations saved for backward per decoder layer (HF Llama layout, or Liger's RMSNorm and
  SwiGLU on CUDA; attention through SDPA or FlashAttention, so no ``[L, L]`` score matrix); with
  activation checkpointing only each layer's input, plus one layer recomputed for its backward;
* the loss: ``naive`` holds the ``[positions, V]`` logits and the float32 copies autograd keeps
  for log-softmax, entropy and their gradients (:func:`naive_loss_bytes`); ``fused`` drops the
  prompt and padding rows and holds one ``[chunk, V]`` block at a time and the gradients it
  returns (:func:`fused_loss_bytes`, from the kernels' own model :mod:`gem_fast.plan.kernel`);
* SEGA sampling (``gem_fast.sampling``, ``shared_prefix``): the whole model gathered, the prompt
  K/V once per prompt, the k candidates' own K/V, the prefill's per-layer working set and the
  sampler's ``[B·k, V]`` temporaries.

The peak is the largest of the phases (end of forward, the last layer's backward, end of
backward, optimizer step, SEGA prefill and decode), plus fixed, named allowances for what torch's
allocator does not see. Not modelled: allocator fragmentation beyond that allowance, the first
step's lazy AdamW-state creation (the model is the steady state, step >= 2), the data loader,
``torch.compile``'d layers, models other than Llama-shaped decoders (dense gated MLP, RMSNorm,
RoPE, grouped-query attention). bench/memory_plan.py checks the model against measured CPU peaks.

Host memory while the model loads (:func:`host_load_bytes`), per rank: ``--init full`` holds the
whole fp32 model and the safetensors pages it read on every rank; ``--init meta`` its shards only
(bench/load_memory.py measures both).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Mapping

from gem_fast.kernels.chunked import BLOCK_BYTES, chunk_rows
from gem_fast.plan.kernel import naive_loss_bytes, plan_kernel
from gem_fast.plan.shapes import ModelShape
from gem_fast.plan.workload import Setup

__all__ = [
    "GIB", "Precision", "Term", "Phase", "Plan", "precision", "rmsnorm_bytes_per_token",
    "layer_activation_bytes_per_token", "fused_loss_bytes", "plan_memory", "markdown_table", "host_load_bytes",
]

GIB = 2**30
FP32 = 4
BOOL = 1


@dataclass(frozen=True)
class Precision:
    """Element sizes (bytes) of what ``gem_fast.train`` keeps, by device and sharding."""

    master: int  # parameters the optimizer steps, their gradients and AdamW states
    weight: int  # parameters as the matmuls read them (FSDP2's gathered param_dtype)
    compute: int  # matmul outputs: q/k/v, MLP, logits
    residual: int  # residual stream and the final hidden states fed to the loss


def precision(setup: Setup) -> Precision:
    """FSDP2 on CUDA gathers bf16 parameters, so everything runs in bf16; one GPU keeps fp32
    parameters and residual stream while autocast runs the matmuls in bf16; the CPU is fp32."""
    if setup.device == "cpu":
        return Precision(master=FP32, weight=FP32, compute=FP32, residual=FP32)
    if setup.sharded:
        return Precision(master=FP32, weight=2, compute=2, residual=2)
    return Precision(master=FP32, weight=FP32, compute=2, residual=FP32)


def rmsnorm_bytes_per_token(shape: ModelShape, prec: Precision, liger: bool = False) -> int:
    """Bytes an RMSNorm keeps for backward per token, its output (the next matmul's input) included.

    HF: a float32 copy of its input (the input itself when that is fp32) and the normalised
    value cast back to the input dtype; Liger: its input and one fp32 rstd.
    """
    h = shape.hidden
    kept = prec.residual * h + FP32 if liger else FP32 * h + prec.residual * h
    return kept + prec.compute * h


def layer_activation_bytes_per_token(shape: ModelShape, prec: Precision, attention: str, seq_len: int,
                                     liger: bool = False) -> int:
    """Bytes one decoder layer saves for backward, per token of rows of ``seq_len`` (no checkpointing).

    Two RMSNorms (:func:`rmsnorm_bytes_per_token`). Attention: SDPA on a padded batch gets an
    explicit [rows, 1, L, L] bool mask, so HF repeats K/V to every query head; the kernel saves
    q, k, v, its output and the mask converted to the query dtype (``seq_len`` elements per
    token, in every layer). FlashAttention on a padded batch saves unpadded copies of q, k, v,
    its output and the re-padded output that o_proj reads. MLP, HF: gate output, its SiLU, up
    output and their product; Liger's SwiGLU recomputes the SiLU, so one [N, I] fewer.
    """
    d = shape.head_dim
    if attention == "sdpa":
        attn = prec.compute * (4 * shape.heads * d + seq_len)
    else:
        attn = prec.compute * (3 * shape.heads * d + 2 * shape.kv_heads * d)
    attn += FP32 * shape.heads  # log-sum-exp per head
    mlp = (3 if liger else 4) * prec.compute * shape.intermediate
    return 2 * rmsnorm_bytes_per_token(shape, prec, liger) + attn + mlp


def fused_loss_bytes(tokens: int, hidden: int, vocab: int, prec: Precision, device: str) -> int:
    """Peak bytes of ``weighted_logprob_loss`` on the fused path, which computes its gradients in
    the forward: the kernel's extra memory (:func:`gem_fast.plan.kernel.plan_kernel`: one
    ``[chunk, V]`` block, the torch rows' fp32 temporaries on the CPU, none in the Triton rows
    on CUDA, per-token vectors), the ``[N, H]`` and ``[V, H]`` gradients it returns in the GEMM
    dtype, and where the weights are fp32 under autocast (one GPU) their bf16 copies for the GEMMs.
    """
    backend = "triton" if device == "cuda" else "torch"
    kernel = plan_kernel("weighted_loss", tokens, hidden, vocab, element_size=prec.compute,
                         backend=backend, device_type=device)
    gradients = (tokens + vocab) * hidden * prec.compute
    autocast_copies = (tokens + vocab) * hidden * prec.compute if prec.weight != prec.compute else 0
    return kernel.extra_bytes + gradients + autocast_copies


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int


@dataclass(frozen=True)
class Phase:
    """A moment of the step and the allocations alive at it."""

    name: str
    terms: tuple[Term, ...]

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.terms)


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    setup: Setup
    phases: tuple[Phase, ...]
    allowances: tuple[Term, ...]  # outside torch's allocator: added once to the largest phase
    static_bytes: int  # master parameters and optimizer states, alive across steps

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.bytes)

    @property
    def modelled_bytes(self) -> int:
        """Peak of torch allocations (what ``max_memory_allocated`` or the RSS growth measures)."""
        return self.peak_phase.bytes

    @property
    def total_bytes(self) -> int:
        return self.modelled_bytes + sum(t.bytes for t in self.allowances)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


def _allowances(setup: Setup) -> tuple[Term, ...]:
    if setup.device == "cpu":
        # About 0.4 GiB measured on the development machine after importing gem_fast.train.
        return (Term("allowance: interpreter, torch and transformers resident", GIB // 2),)
    terms = [Term("allowance: CUDA context and kernels", GIB // 2)]
    if setup.sharded:
        terms.append(Term("allowance: NCCL communicator buffers", GIB // 2))
    # Blocks the caching allocator reserved but cannot reuse for the next request (fragmentation).
    terms.append(Term("allowance: allocator slack", 2 * GIB))
    return tuple(terms)


def plan_memory(shape: ModelShape, setup: Setup) -> Plan:
    """Per-rank memory of one training step of ``setup`` on ``shape``: its phases and allowances.

    Each phase lists the allocations alive at that moment (bytes per rank); the peak is the
    largest phase plus the allowances. Shapes: the decoder sees ``setup.tokens`` tokens; the
    naive loss builds ``setup.positions`` × V logits, the fused one reads ``setup.scored`` rows.
    """
    prec = precision(setup)
    w = setup.world_size
    split = f" (÷{w})" if setup.sharded else ""
    n_act = setup.tokens
    h, v = shape.hidden, shape.vocab

    static = (
        Term(f"master parameters, fp32{split}", FP32 * shape.params() // w),
        Term(f"AdamW exp_avg + exp_avg_sq, fp32{split}", 2 * FP32 * shape.params() // w),
    )
    grads = Term(f"gradients, fp32{split}", FP32 * shape.params() // w)

    per_layer = n_act * layer_activation_bytes_per_token(shape, prec, setup.attention_kind, setup.seq_len,
                                                         setup.liger)
    if setup.activation_checkpointing:
        saved = Term("saved activations (AC: layer inputs)", shape.layers * prec.residual * h * n_act)
        recompute = (Term("one layer recomputed for its backward", per_layer),)
    else:
        saved = Term("saved activations (all layers)", shape.layers * per_layer)
        recompute = ()
    if setup.attention_kind == "sdpa":
        # HF's [rows, 1, L, L] bool mask, built once per forward, is alive until the forward ends.
        saved = replace(saved, bytes=saved.bytes + setup.micro_batch * setup.seq_len**2 * BOOL)
    # The final norm's saved tensors and output, and the [positions, H] copy the loss flattens
    # (the last position is sliced off); the fused path also gathers the scored rows.
    head_input_bytes = (n_act * rmsnorm_bytes_per_token(shape, prec, setup.liger)
                        + setup.positions * h * prec.residual)
    if setup.loss == "naive":
        loss = Term(f"loss: naive, [{setup.positions}, V] logits + 6 fp32 copies",
                    naive_loss_bytes(setup.positions, v, prec.compute))
    else:
        head_input_bytes += setup.scored * h * prec.residual
        chunk = chunk_rows(setup.scored, v, prec.compute, setup.device, BLOCK_BYTES[setup.device])
        loss = Term(f"loss: fused, {setup.scored} rows in {chunk}-row chunks + dW",
                    fused_loss_bytes(setup.scored, h, v, prec, setup.device))
    head_input = Term("final norm + loss input hidden", head_input_bytes)

    if setup.sharded:
        # The root unit is not resharded after forward. In forward FSDP2 keeps each all-gather's output
        # until the next all-gather, so the last layer's outlives it into the loss. A layer is gathered
        # again for its backward, with the next one prefetched and an all-gather buffer being copied out.
        root = Term(f"root unit gathered (embeddings, head), {_dtype(prec.weight)}", prec.weight * shape.root_params())
        forward_weights = (root, Term("last layer's all-gather output, freed at the next all-gather",
                                      prec.weight * shape.layer_params()))
        backward_weights = (root, Term(f"2 layers gathered + all-gather buffer, {_dtype(prec.weight)}",
                                       3 * prec.weight * shape.layer_params()))
        head_grad = Term(f"LM head gradient, unsharded {_dtype(prec.weight)}", prec.weight * v * h)
        # The layer's unsharded grads, its fp32 reduce-scatter input and (CUDA) the previous one still in flight.
        in_flight = 2 if setup.device == "cuda" else 1
        layer_grads = Term("layer grads + fp32 reduce-scatter buffers",
                           (prec.weight + in_flight * FP32) * shape.layer_params())
        root_reduce: tuple[Term, ...] = (Term("root unit gathered + unsharded grads + fp32 reduce-scatter input",
                                              (2 * prec.weight + FP32) * shape.root_params()),)
    else:
        # Autocast casts each matmul weight to bf16 once per forward; autograd keeps the copies for backward.
        forward_weights = (Term("autocast bf16 weight copies", 2 * (shape.params() - shape.root_params() + v * h)),
                           ) if setup.device == "cuda" else ()
        backward_weights = forward_weights
        head_grad = Term("LM head gradient, fp32", FP32 * v * h)
        layer_grads = Term("layer grads, fp32", FP32 * shape.layer_params())
        # A tied embedding's dense gradient is a second [V, H] tensor until added to the head's.
        root_reduce = (Term("embedding gradient before accumulation, fp32", FP32 * v * h),) if shape.tied else ()
    # Gradients of one layer's activations while its backward runs: MLP ([N, I] ×3) and residual ([N, H] ×2).
    act_grads = Term("activation gradients of one layer",
                     n_act * (3 * prec.compute * shape.intermediate + 2 * prec.residual * h))

    phases = [
        Phase("end of forward (loss)", (*static, *forward_weights, saved, head_input, loss)),
        Phase("backward, last layer", (*static, *backward_weights, saved, *recompute, head_grad, act_grads,
                                       layer_grads)),
        Phase("end of backward", (*static, grads, *root_reduce)),
        Phase("optimizer step", (*static, grads, _optimizer_temporary(shape, setup))),
    ]
    if setup.sampling is not None:
        phases += _sampling_phases(shape, setup, static, prec)
    return Plan(shape, setup, tuple(phases), _allowances(setup), sum(t.bytes for t in static))


def _dtype(element: int) -> str:
    return "fp32" if element == FP32 else "bf16"


def _optimizer_temporary(shape: ModelShape, setup: Setup) -> Term:
    """AdamW's step temporaries: the foreach path (CUDA) builds sqrt(exp_avg_sq) for every tensor
    at once; the per-tensor path (CPU) holds two temporaries of the largest tensor."""
    if setup.device == "cuda":
        return Term("AdamW foreach sqrt(v) temporaries", FP32 * shape.params() // setup.world_size)
    return Term("AdamW per-tensor temporaries", 2 * FP32 * shape.largest_param() // setup.world_size)


def _sampling_phases(shape: ModelShape, setup: Setup, static: tuple[Term, ...], prec: Precision) -> list[Phase]:
    """Prefill and the last decode step of ``sample_group`` (no autograd). Under FSDP2 every unit is
    gathered for the whole call; one GPU samples with its fp32 parameters (no autocast around it)."""
    s = setup.sampling
    element = prec.weight  # parameters, activations and K/V while sampling
    h, d = shape.hidden, shape.head_dim
    held = [*static]
    if setup.sharded:
        held.append(Term(f"whole model gathered, {_dtype(element)}", element * shape.params()))
    held.append(Term("prompt K/V, once per prompt", shape.kv_bytes_per_token(element) * s.prompts * s.prompt_len))
    # Prefill, one layer at a time over the prompt tokens: residual in and out and the norm output,
    # then either attention (q, k and v — repeated to every head by SDPA with a padding mask —, its
    # output, SDPA's mask converted to the query dtype) or the MLP (up, SiLU(gate), their product).
    if setup.attention_kind == "sdpa":
        attention = 4 * shape.heads * d + s.prompt_len
    else:
        attention = 2 * shape.heads * d + 2 * shape.kv_heads * d
    per_token = element * (3 * h + max(attention, 3 * shape.intermediate))
    prefill = s.prompts * s.prompt_len * per_token
    if setup.attention_kind == "sdpa":
        prefill += s.prompts * s.prompt_len**2 * BOOL  # HF's bool mask for the left-padded prompts
    rows = s.prompts * s.k
    # Decode: [B·k, V] logits, the top-p sampler's fp32 scores, probs, sorted probs, int64 order, two
    # masks, noise and log-noise; the entropy's torch rows (CPU) add two fp32 blocks of the logits.
    decode = rows * shape.vocab * (element + 6 * FP32 + 8 + 2 * BOOL)
    if setup.device == "cpu":
        decode += plan_kernel("entropy", rows, shape.hidden, shape.vocab, element_size=FP32, backend="torch",
                              device_type="cpu").term("fp32 row temporaries")
    return [
        Phase("SEGA prefill", (*held, Term("prefill: one layer's working set + mask", prefill))),
        Phase("SEGA decode", (*held, Term("generated K/V of the k candidates",
                                          shape.kv_bytes_per_token(element) * rows * s.new_tokens),
                              Term("decode step: logits + top-p sampler temporaries", decode))),
    ]


def host_load_bytes(shape: ModelShape, *, world_size: int, init: Literal["meta", "full"], device: str = "cpu",
                    source_element: int = 2) -> int:
    """Peak host (CPU) memory of one rank while the model loads, bytes, from ``source_element``-byte
    safetensors (2: bf16, as models ship; 4: fp32).

    full: every rank builds the whole fp32 model and reads every tensor of the files, whose
    memory-mapped pages stay resident until the load ends (what ``fully_shard`` frees comes after).
    meta: on the CPU a rank allocates its fp32 shards (on CUDA they go to the GPU) and reads one
    tensor's dim-0 slice at a time, whose file pages are resident until the next (the largest
    tensor's slice in flight).
    """
    params = shape.params()
    if init == "full":
        return params * (FP32 + source_element)
    shard, largest_slice = -(-params // world_size), -(-shape.largest_param() // world_size)
    return shard * (FP32 if device == "cpu" else 0) + largest_slice * source_element


def _gib(n: int | None) -> str:
    return "–" if n is None else f"{n / GIB:.2f}"


def markdown_table(plans: Mapping[str, Plan], capacity_gib: float | None = None) -> str:
    """Term-by-term table, one column per plan (e.g. ``{"naive": ..., "fused": ...}``), GiB per rank.

    Each column lists the terms of its own peak phase (named in the header row below it), then
    every phase's total, the allowances, the peak and whether it fits ``capacity_gib``.
    """
    names = list(plans)
    peak_terms = {name: {t.name: t.bytes for t in plan.peak_phase.terms} for name, plan in plans.items()}
    rows: list[str] = []
    for plan in plans.values():
        rows += [t.name for t in plan.peak_phase.terms if t.name not in rows]
    lines = [f"| GiB per rank | {' | '.join(names)} |", "|---|" + "---:|" * len(names),
             "| *peak phase* | " + " | ".join(f"*{p.peak_phase.name}*" for p in plans.values()) + " |"]
    lines += [f"| {row} | " + " | ".join(_gib(peak_terms[n].get(row)) for n in names) + " |" for row in rows]
    lines.append("| **phase totals** |" + " |" * len(names))
    for phase in next(iter(plans.values())).phases:
        lines.append(f"| {phase.name} | " + " | ".join(_gib(p.phase(phase.name).bytes) for p in plans.values()) + " |")
    for i, allowance in enumerate(next(iter(plans.values())).allowances):
        lines.append(f"| {allowance.name} | " + " | ".join(_gib(p.allowances[i].bytes) for p in plans.values()) + " |")
    lines.append("| **peak** | " + " | ".join(f"**{_gib(p.total_bytes)}**" for p in plans.values()) + " |")
    if capacity_gib is not None:
        lines.append(f"| fits {capacity_gib:g} GiB | " + " | ".join(
            "yes" if p.total_bytes <= capacity_gib * GIB else "**no**" for p in plans.values()) + " |")
    return "\n".join(lines)
