"""DPO and IPO on human pairs, against the initial weights as the reference model.

Both take sequence log-probs summed over response tokens; ``length_normalize`` switches them to
per-token means (TRL does this for IPO). The reference model's log-probs of every pair are
computed once, before training (:func:`reference_logprobs`), and looked up per micro-step.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from gem_fast.config import RunConfig
from gem_fast.data import EncodedBatch, PreferencePair, encode_pairs
from gem_fast.distributed import DistEnv, all_gather_strided, broadcast_flag
from gem_fast.logprobs import PairLogprobs, sequence_logprobs
from gem_fast.objectives.base import Objective, step_rows
from gem_fast.policy import MicroBatch, PolicyLoss, StepBatches
from gem_fast.run_dir import file_sha256

__all__ = ["dpo_loss", "ipo_loss", "preference_loss", "reference_logprobs", "PairObjective"]

logger = logging.getLogger(__name__)


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


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """DPO (Rafailov et al.): mean of ``-log σ(β·((π_c - π_r) - (ref_c - ref_r)))``.

    All inputs [n] sequence log-probs (nats); returns a scalar.
    """
    margin = _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return -F.logsigmoid(beta * margin).mean()


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """IPO (Azar et al.): mean of ``((π_c - π_r) - (ref_c - ref_r) - 1/(2β))²``.

    All inputs [n] sequence log-probs (nats); returns a scalar.
    """
    margin = _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return ((margin - 1.0 / (2.0 * beta)) ** 2).mean()


def preference_loss(
    kind: Literal["dpo", "ipo"],
    model: torch.nn.Module,
    batch: EncodedBatch,
    reference: PairLogprobs,
    *,
    beta: float = 0.1,
    length_normalize: bool = False,
    backend: str = "auto",
    prefix_sharing: bool = False,
) -> torch.Tensor:
    """DPO or IPO loss of ``model`` on ``batch``: 2n rows from :func:`gem_fast.data.encode_pairs`
    (chosen rows first), ``reference`` the reference model's log-probs of the same n pairs;
    ``prefix_sharing``: each pair's prompt computed once (:func:`gem_fast.logprobs.sequence_logprobs`)."""
    loss_fn = {"dpo": dpo_loss, "ipo": ipo_loss}.get(kind)
    if loss_fn is None:
        raise ValueError(f"kind must be 'dpo' or 'ipo', got {kind!r}")
    rows = batch.input_ids.shape[0]
    if rows % 2:
        raise ValueError(f"batch must hold 2n rows (chosen then rejected), got {rows}")
    n = rows // 2
    if reference is None or reference.chosen.shape != (n,):
        raise ValueError(f"reference must hold the reference log-probs of the batch's {n} pairs for {kind!r}")
    logps = sequence_logprobs(model, batch, length_normalize=length_normalize, backend=backend,
                              prefix_sharing=prefix_sharing)
    ref_chosen, ref_rejected = (t.to(logps.device) for t in reference.values(length_normalize=length_normalize))
    return loss_fn(logps[:n], logps[n:], ref_chosen, ref_rejected, beta=beta)


_COLUMNS = ("chosen", "rejected", "chosen_tokens", "rejected_tokens")


def reference_logprobs(policy: PolicyLoss, pairs: list[PreferencePair], tokenizer: Any, run: RunConfig,
                       env: DistEnv, cache: Path) -> PairLogprobs:
    """π_ref log-probs of every pair from the policy's current (initial) weights, on CPU.

    Rank r scores pairs r, r + world, ... on its device and the slices are all-gathered. The
    table goes to ``cache`` (safetensors, written atomically by rank 0); a resumed run
    (``run.resume``) reads it instead of scoring the file again when it was made from the same
    data file contents, model path and tokenisation. Rank 0 decides for all ranks, so they run
    the same collectives.
    """
    key = {"train_jsonl_sha256": file_sha256(run.train_jsonl),
           "pairs": str(len(pairs)), "model": str(run.model_name_or_path), "max_length": str(run.max_length),
           "chat_template": str(run.chat_template)}
    hit = False
    if run.resume and env.rank == 0 and cache.is_file():
        with safe_open(cache, "pt") as f:
            hit = f.metadata() == key
        if not hit:
            logger.info("%s was computed for other data or settings; scoring the reference again", cache)
    if broadcast_flag(hit, env):
        logger.info("reference log-probs read from %s", cache)
        with safe_open(cache, "pt") as f:
            return PairLogprobs(*(f.get_tensor(n) for n in _COLUMNS))
    mine = pairs[env.rank :: env.world]
    per_rank = math.ceil(len(pairs) / env.world)
    # Every rank must run as many FSDP forwards as the others: pad the slice with a repeated pair.
    mine = mine + [pairs[0]] * (per_rank - len(mine))
    policy.eval()
    local = policy.pair_logprobs(tokenizer, mine, batch_size=run.batch_size, max_length=run.max_length,
                                 chat_template=run.chat_template, desc="reference log-probs",
                                 progress=None if run.progress and env.rank == 0 else False)
    policy.train()
    columns = [all_gather_strided(getattr(local, name).to(env.device), env)[: len(pairs)].cpu() for name in _COLUMNS]
    if env.rank == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(cache.name + ".tmp")
        save_file(dict(zip(_COLUMNS, columns)), partial, metadata=key)
        os.replace(partial, cache)
    return PairLogprobs(*columns)


class PairObjective(Objective):
    """DPO or IPO (``run.objective``) with the pair section's β and length normalisation."""

    reference: PairLogprobs

    @property
    def pair_loss(self) -> functools.partial:
        return functools.partial(preference_loss, self.cfg.run.objective, beta=self.cfg.pair.beta,
                                 length_normalize=self.cfg.pair.length_normalize)

    def prepare(self, policy: PolicyLoss, out_dir: Path) -> None:
        """The initial weights are the reference, also on resume: scored before the checkpoint loads."""
        self.reference = reference_logprobs(policy, self.pairs, self.tokenizer, self.cfg.run, self.env,
                                            out_dir / "reference_logprobs.safetensors")

    def step_batches(self, policy: PolicyLoss, step: int) -> StepBatches:
        """Each micro-step's pairs (chosen rows, then rejected) with their reference log-probs.

        Every micro-step holds ``batch_size`` pairs, so the global mean over pairs is the mean of the
        micro-step means: each is scaled by ``1/grad_accum`` and FSDP averages over ranks.
        """
        run, env = self.cfg.run, self.env
        micro_batches = []
        for micro in range(run.grad_accum):
            index = step_rows(step, micro, len(self.pairs), run, env)
            batch = encode_pairs(self.tokenizer, [self.pairs[i] for i in index], max_length=run.max_length,
                                 chat_template=run.chat_template)
            micro_batches.append(MicroBatch(batch.to(env.device), reference=self.reference.select(torch.tensor(index)),
                                            loss_scale=1 / run.grad_accum))
        return micro_batches, {}
