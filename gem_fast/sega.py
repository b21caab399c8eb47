"""SEGA (Self-Evaluated Group Advantage, GEM Eq. 2) and the SFT / DPO / IPO baselines.

For a group of k candidates a_i of prompt q with scores S_i (Eq. 1, or ranking ratings):

    r_i = f(S_i),   A_i = r_i - mean_j r_j,   L = -sum_i A_i * log π(a_i | q),

with f = identity or softmax(S / temperature) over the group, and log π(a|q) the sum of the
response tokens' log-probs (prompt and padding masked). Advantages are constants.

Choices made where the paper is silent:

* Trimming drops the ``trim`` lowest-scoring candidates before the mapping: the softmax and
  the mean run over the kept ones only, and the trimmed get A = 0.
* A ``-inf`` score (no final answer, see :mod:`gem_fast.scoring`) gets reward 0 under
  softmax; under identity it takes the lowest finite score of its group. A group without
  any finite score gets A = 0 everywhere (nothing to compare).
* Normalisation of the loss (``normalize``): "group" divides the sum over all candidates'
  tokens by the number of groups B (Eq. 2 literally, averaged over prompts; long responses
  weigh more); "token" divides by the number of response tokens in the batch (every
  token weighs the same, as in DAPO-style GRPO).
* DPO and IPO take sequence log-probs summed over response tokens; ``length_normalize``
  switches both to per-token means (TRL does this for IPO). The reference model's
  log-probs are computed once (:func:`gem_fast.logprobs.pair_logprobs`) and looked up.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from gem_fast.data import EncodedBatch
from gem_fast.integrations import output_head
from gem_fast.kernels import weighted_logprob_loss
from gem_fast.logprobs import (
    IGNORE_INDEX,
    PairLogprobs,
    response_hidden,
    response_targets,
    sequence_logprobs,
)
from gem_fast.ranking import trim_mask

__all__ = [
    "MAPPINGS",
    "OBJECTIVES",
    "map_rewards",
    "sega_advantages",
    "sega_loss",
    "sft_loss",
    "dpo_loss",
    "ipo_loss",
    "pair_objective_loss",
]

MAPPINGS = ("identity", "softmax")
OBJECTIVES = ("sega", "sft", "dpo", "ipo")
Mapping = Literal["identity", "softmax"]


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or not scores.dtype.is_floating_point:
        raise ValueError("scores must be a floating-point torch.Tensor [..., k]")
    if scores.dim() < 1 or scores.shape[-1] < 1:
        raise ValueError(f"scores must have shape [..., k] with k >= 1, got {tuple(scores.shape)}")


def map_rewards(
    scores: torch.Tensor,
    *,
    mapping: Mapping = "softmax",
    temperature: float = 1.0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rewards r = f(S) [..., k] float32 over the ``keep``-marked candidates of each group.

    identity: r = S, with ``-inf`` raised to the group's lowest finite kept score; softmax:
    r = softmax(S / temperature) over the kept candidates (``-inf`` gives 0). Candidates not
    kept get r = 0; a group with no finite kept score gets r = 0.
    """
    _check_scores(scores)
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    s = scores.float()
    keep = torch.ones_like(s, dtype=torch.bool) if keep is None else keep.bool()
    if keep.shape != s.shape:
        raise ValueError(f"keep has shape {tuple(keep.shape)}, expected {tuple(s.shape)}")
    finite = torch.isfinite(s) & keep
    scored = finite.any(-1, keepdim=True)
    if mapping == "identity":
        lowest = s.masked_fill(~finite, float("inf")).amin(-1, keepdim=True)
        r = torch.where(s == float("-inf"), lowest, s)
    else:
        r = torch.softmax((s / temperature).masked_fill(~keep, float("-inf")), dim=-1)
    return torch.where(keep & scored, r, 0.0)


def sega_advantages(
    scores: torch.Tensor,
    *,
    mapping: Mapping = "softmax",
    temperature: float = 1.0,
    trim: int = 0,
) -> torch.Tensor:
    """Group-mean advantages A = r - mean(r) [..., k] float32 (zero mean over kept candidates).

    ``scores`` [..., k] (Eq. 1 scores or ranking ratings, higher is better); the ``trim``
    lowest of each group are dropped and get A = 0. See :func:`map_rewards` for r.
    """
    _check_scores(scores)
    keep = trim_mask(scores, trim)
    r = map_rewards(scores, mapping=mapping, temperature=temperature, keep=keep)
    kept = keep.float()
    baseline = (r * kept).sum(-1, keepdim=True) / kept.sum(-1, keepdim=True)
    scored = (torch.isfinite(scores) & keep).any(-1, keepdim=True)
    return torch.where(keep & scored, r - baseline, 0.0)


def _check_response_inputs(hidden: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError("hidden must be a torch.Tensor [N, T, H]")
    if not isinstance(targets, torch.Tensor) or targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:2])} (hidden without H)")


def sega_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    normalize: Literal["group", "token"] = "group",
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """SEGA loss ``-Σ_i A_i log π(a_i|q)`` (Eq. 2), normalised, as a float32 scalar.

    ``hidden`` [N, T, H] and ``targets`` [N, T] of the N = B*k candidate rows, prompt-major
    (e.g. from :func:`gem_fast.logprobs.response_hidden` / ``response_targets``);
    ``advantages`` [B, k] (treated as constants); ``weight``/``bias``/``logit_scale``/``logit_softcap``
    the LM head (:func:`gem_fast.integrations.output_head`).
    ``normalize``: "group" divides by B, "token" by the batch's response-token count.
    """
    _check_response_inputs(hidden, targets)
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 2:
        raise ValueError("advantages must be a torch.Tensor [B, k]")
    if advantages.numel() != targets.shape[0]:
        raise ValueError(f"advantages has {advantages.numel()} entries for {targets.shape[0]} rows of targets")
    if normalize == "group":
        scale: float | torch.Tensor = 1.0 / advantages.shape[0]
    elif normalize == "token":
        scale = 1.0 / (targets != ignore_index).sum().clamp(min=1)
    else:
        raise ValueError(f"normalize must be 'group' or 'token', got {normalize!r}")
    per_row = advantages.detach().float().reshape(-1, 1) * scale
    return weighted_logprob_loss(
        hidden, weight, targets, per_row.expand(targets.shape), bias=bias, ignore_index=ignore_index, backend=backend,
        logit_scale=logit_scale, logit_softcap=logit_softcap,
    )


def sft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Mean negative log-likelihood over response tokens (prompt and padding excluded), float32 scalar.

    Shapes as :func:`sega_loss`.
    """
    _check_response_inputs(hidden, targets)
    valid = targets != ignore_index
    token_weights = valid.float() / valid.sum().clamp(min=1)
    return weighted_logprob_loss(
        hidden, weight, targets, token_weights, bias=bias, ignore_index=ignore_index, backend=backend,
        logit_scale=logit_scale, logit_softcap=logit_softcap,
    )


def _log_ratio_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    shape = policy_chosen.shape
    for name, t in (("policy_rejected", policy_rejected), ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like policy_chosen")
    # Reference log-probs are data, never trained through.
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected).detach()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
) -> torch.Tensor:
    """DPO (Rafailov et al.): mean of ``-log σ(β·((π_c - π_r) - (ref_c - ref_r)))``.

    All inputs [n] sequence log-probs (nats); returns a scalar.
    """
    margin = _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return -F.logsigmoid(beta * margin).mean()


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
) -> torch.Tensor:
    """IPO (Azar et al.): mean of ``((π_c - π_r) - (ref_c - ref_r) - 1/(2β))²``.

    All inputs [n] sequence log-probs (nats); returns a scalar.
    """
    margin = _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return ((margin - 1.0 / (2.0 * beta)) ** 2).mean()


def pair_objective_loss(
    objective: Literal["sft", "dpo", "ipo"],
    model: torch.nn.Module,
    batch: EncodedBatch,
    reference: PairLogprobs | None = None,
    *,
    beta: float = 0.1,
    length_normalize: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Loss of a baseline on a batch of human pairs, picked by name (the ``objective`` flag).

    ``batch``: 2n rows from :func:`gem_fast.data.encode_pairs` (chosen rows first).
    "sft" trains on the chosen responses; "dpo"/"ipo" need ``reference``, the reference
    model's log-probs of the same n pairs (e.g. ``cached.select(batch_indices)``).
    """
    if objective not in ("sft", "dpo", "ipo"):
        raise ValueError(f"objective must be 'sft', 'dpo' or 'ipo' here (SEGA needs sampled groups), got {objective!r}")
    rows = batch.input_ids.shape[0]
    if rows % 2:
        raise ValueError(f"batch must hold 2n rows (chosen then rejected), got {rows}")
    n = rows // 2
    if objective == "sft":
        chosen = batch.rows(slice(0, n))
        head = output_head(model)
        return sft_loss(response_hidden(model, chosen), head.weight, response_targets(chosen), bias=head.bias,
                        backend=backend, logit_scale=head.logit_scale, logit_softcap=head.logit_softcap)
    if reference is None or reference.chosen.shape != (n,):
        raise ValueError(f"reference must hold the reference log-probs of the batch's {n} pairs for {objective!r}")
    logps = sequence_logprobs(model, batch, length_normalize=length_normalize, backend=backend)
    ref_chosen, ref_rejected = (t.to(logps.device) for t in reference.values(length_normalize=length_normalize))
    loss_fn = dpo_loss if objective == "dpo" else ipo_loss
    return loss_fn(logps[:n], logps[n:], ref_chosen, ref_rejected, beta=beta)
