"""The fused kernels inside other RLHF code: a Hugging Face causal LM that returns per-token
log-probs and entropy instead of logits.

    from gem_fast.integrations import patch_causal_lm
    patch_causal_lm(model)                       # before or after FSDP2 fully_shard, on every rank
    out = model(input_ids=ids, attention_mask=mask, logprob_targets=targets, temperature=0.7)
    out.logprobs, out.entropy                    # [B, L] float32, 0 where targets == -100

``targets[:, t]`` is the token whose log-prob the hidden state at position t gives (the next
token: ``targets = ids[:, 1:]`` padded with -100 at the end, response positions only).

How: a call with ``logprob_targets`` runs the forward that was there before the patch (with
whatever wraps it: accelerate's hooks, an Accelerator's autocast, FSDP2's gathering), and a
forward pre-hook on the output embeddings takes their input, the hidden states the model's own
head would see (after any final norm, hidden-state scaling or prediction-head transform), runs the
kernel on it and hands the head an empty slice instead, so the forward's logits cost nothing. What
the family's forward does to the head's output (soft-caps, logit scales, a cut vocabulary) is read
from its config by :func:`gem_fast.logprobs.output_head`. Calls without ``logprob_targets`` run the
original forward unchanged, and the patched ``forward`` keeps its signature (``generate`` inspects it).

Because a family can do something to its logits that nobody listed, :func:`patch_causal_lm` checks
itself once against the model's own logits on a few tokens and refuses by name when they differ.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from gem_fast.kernels import fused_logprob_entropy
from gem_fast.logprobs import describe_model, output_embeddings, output_head
from gem_fast.trl_support import TrlFusedOutput, trl_fused_forward

__all__ = ["FusedLogprobOutput", "TrlFusedOutput", "patch_causal_lm", "unpatch_causal_lm", "verify_patch"]

logger = logging.getLogger(__name__)

_PATCH = "_gem_fast_patch"
# transformers 5.24 renamed the model outputs' ``past_key_values`` to ``cache`` (the old name is a
# deprecated alias there); the patched output follows the installed version.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

FusedLogprobOutput = dataclasses.make_dataclass(
    "FusedLogprobOutput",
    [("logprobs", "torch.Tensor | None", dataclasses.field(default=None)),  # [..., L] float32 nats; 0 where ignored
     ("entropy", "torch.Tensor | None", dataclasses.field(default=None)),  # [..., L] float32 nats, softmax(z / T)
     (CACHE_FIELD, Any, dataclasses.field(default=None))],  # the model's KV cache, as its own output has it
    bases=(ModelOutput,),
    namespace={"__module__": __name__,
               "__doc__": "What a patched model returns for a call with ``logprob_targets``: ``logprobs`` and "
                          "``entropy`` [..., L] float32 nats (0 where the target is ignored), and the model's cache "
                          f"(``{CACHE_FIELD}``, as the installed transformers names it)."})


@dataclasses.dataclass
class _FusedCall:
    """A call with targets in flight: what the head's pre-hook needs, and where it leaves its results."""

    targets: torch.Tensor
    temperature: float
    options: dict
    results: tuple | None = None


@dataclasses.dataclass
class _Patch:
    replaced: Any  # the instance's own ``forward`` before the patch (a wrapper), None where it was the class's
    hook: torch.utils.hooks.RemovableHandle


def patch_causal_lm(model: torch.nn.Module, *, backend: str = "auto", temperature: float = 1.0, verify: bool = True,
                    **kernel_options: Any) -> torch.nn.Module:
    """Give ``model.forward`` the keywords ``logprob_targets`` ([..., L] int64, -100 = ignored) and
    ``temperature`` (default: this call's); with them it returns :class:`FusedLogprobOutput` (no
    logits). TRL's convention works too: ``model(..., labels=labels, fused_lm_head=True)``
    (``labels`` aligned with ``input_ids``, or pre-shifted ``shift_labels``) returns
    :class:`TrlFusedOutput` with the settings of the TRL head it replaced (temperature, fields,
    fp32 head; :mod:`gem_fast.trl_support`), so patching a model after TRL's trainer has added its
    own fused head makes TRL read gem_fast's numbers. ``backend`` and
    ``kernel_options`` (``block_bytes``, ``dw_accumulation``, ``drop_ignored_rows``) go to
    :func:`gem_fast.kernels.fused_logprob_entropy`.

    ``verify`` (default): check the patch once with :func:`verify_patch` (one no-grad forward of
    each kind on 16 tokens) and, where it disagrees with the model's own logits, undo it and raise
    ``ValueError``. ``verify=False`` skips that check: for a family already verified at this
    model's dtype, where one more forward at start-up matters. Under FSDP2 the check runs the
    sharded forward, so call this on every rank (as any forward). Returns the model, patched in
    place; patching twice is a no-op; :func:`unpatch_causal_lm` undoes it."""
    head_module = output_embeddings(model)
    if _PATCH in vars(model):
        return model
    original = model.forward
    default_temperature = temperature
    calls: list[_FusedCall] = []

    def take_hidden(module: torch.nn.Module, args: tuple) -> tuple | None:
        # The head's input is the hidden state the model's own logits come from; the kernel runs on
        # it here, inside every wrapper of the forward, and the head itself gets zero positions.
        if not calls:
            return None
        call = calls[-1]
        hidden = args[0] if args else None
        if call.results is not None:
            raise ValueError(f"model: the forward of {describe_model(model)} calls its output embeddings "
                             "more than once")
        if not (isinstance(hidden, torch.Tensor) and hidden.is_floating_point()
                and hidden.shape[:-1] == call.targets.shape):
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"model: the forward of {describe_model(model)} calls its output embeddings with {got}, "
                             f"not the hidden states [*targets.shape, H] of targets {tuple(call.targets.shape)}")
        call.results = tuple(output_head(model).apply(fused_logprob_entropy, hidden, call.targets,
                                                      temperature=call.temperature, backend=backend,
                                                      **kernel_options, **call.options))
        return (hidden[..., :0, :], *args[1:])

    def logprobs_and_entropy(args: tuple, kwargs: dict, targets: torch.Tensor, temperature: float, **options: Any):
        # ``options``: extra kernel keywords of a caller (TRL's fused head: row statistics, fp32 head).
        call = _FusedCall(targets, temperature, options)
        calls.append(call)
        try:
            outputs = original(*args, **kwargs)
        finally:
            calls.pop()
        if call.results is None:
            raise ValueError(f"model: the forward of {describe_model(model)} never calls its output embeddings "
                             f"({type(head_module).__name__}), so their input cannot be taken")
        return outputs, *call.results

    @functools.wraps(original)
    def forward(*args: Any, logprob_targets: torch.Tensor | None = None, temperature: float = default_temperature,
                fused_lm_head: bool = False, labels: torch.Tensor | None = None,
                shift_labels: torch.Tensor | None = None, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if fused_lm_head:
            return trl_fused_forward(original, logprobs_and_entropy, args, kwargs, labels, shift_labels, num_items_in_batch, temperature)
        if logprob_targets is None:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        outputs, logprobs, entropy = logprobs_and_entropy(args, kwargs, logprob_targets, temperature)
        return FusedLogprobOutput(logprobs=logprobs, entropy=entropy, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD, None)})

    setattr(model, _PATCH, _Patch(vars(model).get("forward"), head_module.register_forward_pre_hook(take_hidden)))
    model.forward = forward
    if not verify:
        logger.info("gem_fast.integrations: %s patched without verification (verify=False)", describe_model(model))
        return model
    try:
        verify_patch(model)
    except Exception:
        unpatch_causal_lm(model)
        raise
    return model


def unpatch_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Restore exactly the ``forward`` :func:`patch_causal_lm` replaced (the class's, or the wrapper
    that was there: accelerate's hooks, an Accelerator's autocast) and remove the head's pre-hook; a
    no-op on an unpatched model."""
    patch = vars(model).get(_PATCH)
    if patch is None:
        return model
    patch.hook.remove()
    delattr(model, _PATCH)
    if patch.replaced is None:
        del model.forward
    else:
        model.forward = patch.replaced
    return model


_PROBE_SHAPE = (2, 8)  # tokens the verification runs: logits [2, 8, V], negligible beside a training step


def _special_token_ids(config: Any) -> set[int]:
    """Ids the config gives a meaning (bos/eos/pad, image/audio placeholders), its sub-configs' too."""
    ids: set[int] = set()
    for key, value in vars(config).items():
        if key.endswith(("token_id", "token_ids", "token_index")):
            ids.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int))
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config
            ids |= _special_token_ids(value)
    return ids


def _probe_ids(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    """Fixed pseudo-random ordinary tokens (the same on every rank), on the input embeddings' device."""
    special, generator, ids = _special_token_ids(model.config), torch.Generator().manual_seed(0), []
    while len(ids) < math.prod(_PROBE_SHAPE):
        token = int(torch.randint(vocab, (), generator=generator))
        ids += [] if token in special else [token]
    embeddings = model.get_input_embeddings()
    return torch.tensor(ids).view(_PROBE_SHAPE).to(embeddings.weight.device)


def verify_patch(model: torch.nn.Module) -> None:
    """Check a patched model once against its own forward: log-probs and entropy of 16 probe tokens
    (no grad, eval mode, the model's dtype) from the patched path and from the model's own logits
    (log-softmax in float32). Raises ``ValueError`` naming the model type and the largest
    difference when they disagree beyond what rounding in the model's dtype explains: per logit
    δ = max(1, max|z|)·(ε_dtype + √H·ε_fp32); log-probs within 8δ, entropy within 8δ·(1 + Σ p|z − z̄|).
    A model on the meta device is skipped with a logged reason (call this once its weights are
    loaded). Under FSDP2 it runs the sharded forward: call it on every rank."""
    if _PATCH not in vars(model):
        raise ValueError(f"model: {describe_model(model)} is not patched (patch_causal_lm(model) first)")
    if any(p.device.type == "meta" for p in model.parameters()):
        logger.warning("gem_fast.integrations: %s is on the meta device, so its patch is not verified; call "
                       "gem_fast.integrations.verify_patch(model) once its weights are loaded", describe_model(model))
        return
    head = output_head(model)
    vocab = min(head.weight.shape[0], model.get_input_embeddings().weight.shape[0])
    ids = _probe_ids(model, vocab)
    targets = ids.roll(-1, dims=1)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # through model(...): FSDP2's root hooks gather what the root module holds
            logits = model(input_ids=ids, use_cache=False).logits
            fused = model(input_ids=ids, use_cache=False, logprob_targets=targets, temperature=1.0)
    except Exception as error:
        raise ValueError(f"model: {describe_model(model)}: the patched forward fails on {ids.numel()} probe tokens "
                         f"({type(error).__name__}: {error})") from error
    finally:
        model.train(training)
    if logits.shape[-1] != head.weight.shape[0]:
        raise ValueError(f"model: {describe_model(model)}: its logits have {logits.shape[-1]} entries, its output "
                         f"embeddings (as output_head reads them) {head.weight.shape[0]}")
    z = logits.float()
    logp_all = z.log_softmax(-1)
    p = logp_all.exp()
    want_logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    want_entropy = -(p * logp_all).sum(-1)
    spread = (p * (z - (p * z).sum(-1, keepdim=True)).abs()).sum(-1).max().item()
    eps = max(torch.finfo(logits.dtype).eps, torch.finfo(head.weight.dtype).eps)
    delta = max(1.0, z.abs().max().item()) * (eps + math.sqrt(head.weight.shape[1]) * torch.finfo(torch.float32).eps)
    logp_error = (fused.logprobs - want_logp).abs().max().item()
    entropy_error = (fused.entropy - want_entropy).abs().max().item()
    if not (logp_error <= 8 * delta and entropy_error <= 8 * delta * (1 + spread)):  # False on nan too
        raise ValueError(
            f"model: {describe_model(model)}: the patched head disagrees with the model's own logits on {ids.numel()} "
            f"probe tokens: log-probs by up to {logp_error:.3g} nats (tolerance {8 * delta:.2g} in {logits.dtype}), "
            f"entropy by up to {entropy_error:.3g} (tolerance {8 * delta * (1 + spread):.2g}); its forward does "
            "something to the logits that gem_fast.logprobs.output_head does not read from the config, so the "
            "model is left unpatched")
    logger.info("gem_fast.integrations: %s verified: log-prob error %.2g, entropy error %.2g nats on %d tokens",
                describe_model(model), logp_error, entropy_error, ids.numel())
