"""The training loop for every objective: FSDP2, mixed precision, accumulation, clipping, LR schedule, resume.

One loop (torchtitan's shape): each optimizer step asks the objective (:mod:`gem_fast.objectives`:
SFT, SEGA, DPO, IPO) for its micro-batches, runs :class:`~gem_fast.policy.PolicyLoss` forward and
backward on each, clips, logs one all-reduced record and steps the optimizer.

Launch::

    python scripts/train_sft.py --train_jsonl pairs.jsonl --out_dir outputs/sft     # 1 process
    torchrun --nproc_per_node 8 scripts/train_sft.py --config configs/sft_demo.yaml  # FSDP2
    accelerate launch --num_processes 8 scripts/train_sft.py --config ...  # the same: accelerate
    # exports RANK/WORLD_SIZE/MASTER_ADDR like torchrun; do not enable its own FSDP plugin.

Without ``RANK`` in the environment the model is not sharded (CPU, or one GPU with bf16
autocast); under torchrun see :mod:`gem_fast.distributed`. On CUDA parameters are gathered in
bf16 and gradients reduced in fp32 while the optimizer steps fp32 master shards. Global batch per
optimizer step = ``batch_size × grad_accum × world_size`` rows (SFT), pairs (DPO/IPO) or prompts (SEGA).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from gem_fast.checkpoint import (export_dtype, export_hf, latest_checkpoint, load_checkpoint, load_hf_weights,
                                 save_checkpoint)
from gem_fast.config import OptimConfig, TrainConfig
from gem_fast.distributed import DistEnv, all_reduce_sum, clip_grad_norm, parallelize, process_group
from gem_fast.errors import Interrupted, UsageError, user_input
from gem_fast.guard import DivergenceError, DivergenceGuard, NonFiniteLossError
from gem_fast.kernels import resolve_backend
from gem_fast.liger_layers import apply_liger_layers, use_liger_layers
from gem_fast.models import load_for_training
from gem_fast.objectives import StopRequested, make_objective, read_rows
from gem_fast.policy import MicroBatch, PairLoss, PolicyLoss
from gem_fast.prefix_sharing import resolve_prefix_sharing
from gem_fast.reporting import Reporter
from gem_fast.run_dir import checked_paths, claim_out_dir, file_sha256, run_lock, settings_changes

__all__ = ["TrainResult", "DivergenceError", "NonFiniteLossError", "lr_factor", "build_policy", "train", "run"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a run did: steps completed in total, per-step global losses of this call, last checkpoint."""

    steps_done: int
    losses: list[float]
    checkpoint: Path | None
    stopped_by_signal: int | None  # the signal number that stopped the run early, else None


def lr_factor(step: int, *, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup, then decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def build_policy(model: nn.Module, cfg: TrainConfig, env: DistEnv, total_steps: int, pair_loss: PairLoss | None = None,
                 weights: Path | None = None) -> tuple[PolicyLoss, torch.optim.Optimizer,
                                                       torch.optim.lr_scheduler.LambdaLR]:
    """Liger layers into ``model`` (per ``liger_layers``), then wrap, compile and shard it; a meta-device
    ``model`` is then filled from the safetensors of the HF folder ``weights``, each rank its shards;
    AdamW on its fp32 (master) parameters; warmup + decay schedule over ``total_steps``."""
    parallel, optim = cfg.parallel, cfg.optim
    backend = resolve_backend(parallel.kernel_backend, env.device)
    liger = use_liger_layers(parallel.liger_layers, env.device, model.config.model_type)
    if liger:
        apply_liger_layers(model)
    global_batch = cfg.run.batch_size * cfg.run.grad_accum * env.world
    logger.info(
        "rank %d/%d on %s, sharded=%s, kernel backend %s, attention %s, Liger layers %s, compiled layers %s, "
        "global batch %d, %d steps", env.rank, env.world, env.device, env.sharded, backend,
        model.config._attn_implementation, "on" if liger else "off", "on" if parallel.compile_layers else "off",
        global_batch, total_steps,
    )
    prefix_sharing = resolve_prefix_sharing(cfg.run.prefix_sharing, model, cfg.run.objective, env.device)
    policy = PolicyLoss(model, backend=backend, pair_loss=pair_loss, prefix_sharing=prefix_sharing)
    parallelize(policy, activation_checkpointing=parallel.activation_checkpointing, sharded=env.sharded,
                device=env.device, compile_layers=parallel.compile_layers)
    if weights is not None:
        load_hf_weights(model, weights)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=optim.lr, weight_decay=optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, warmup=optim.warmup_steps, total=total_steps, decay=optim.lr_decay, min_ratio=optim.min_lr_ratio))
    return policy, optimizer, schedule


@contextlib.contextmanager
def _stop_on_signals(announce: bool) -> Iterator[dict[str, int]]:
    """Record SIGTERM/SIGINT instead of dying mid-step; the loop checkpoints and returns at the step end
    (SEGA: between micro-steps; one received while the model loads stops the run after its first step).
    ``announce`` (rank 0) says so in one line. A second SIGINT (Ctrl-C again) raises :class:`Interrupted`
    at once, keeping the last checkpoint; a second SIGTERM does not (torchrun sends one to every worker
    still closing once another has exited)."""
    received: dict[str, int] = {}
    again = Interrupted("stopped at once by a second Ctrl-C; the last checkpoint is kept (--resume continues from it)")
    def record(signum: int, _frame: Any) -> None:
        if "signal" in received and signum == signal.SIGINT:
            received["again"] = signum
            raise again
        if "signal" not in received and announce:
            # os.write, not print: the handler may run inside a write to stderr (tqdm's), which print would re-enter.
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint; resume "
                        "with --resume (Ctrl-C again stops at once)\n".encode())
        received.setdefault("signal", signum)

    previous = {s: signal.signal(s, record) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    except BaseException:  # DCP's CheckpointException derives from BaseException, not Exception
        if "again" in received:  # raised where it was wrapped in another exception (DCP's CheckpointException)
            raise again from None
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _checked_inputs(cfg: TrainConfig) -> tuple[TrainConfig, list[Any], dict[str, Any]]:
    """``cfg`` with its model resolved (:func:`~gem_fast.run_dir.checked_paths`), the objective's training
    rows and the run's training settings (with the data file's SHA-256); :class:`UsageError` naming the
    flag and path before any model loads or out_dir is made."""
    cfg = checked_paths(cfg)
    with user_input():  # the loader's messages name file and line
        pairs = read_rows(cfg)
    return cfg, pairs, {**cfg.training_settings(), "train_data_sha256": file_sha256(cfg.run.train_jsonl)}


def _stop_agreed(local: bool, env: DistEnv) -> bool:
    """Whether any rank was told to stop (one all-reduce when sharded): every rank takes the same branch."""
    if not env.sharded:
        return local
    return all_reduce_sum(torch.tensor([float(local)], device=env.device), env).item() > 0


def _check_resume(ckpt: Path, settings: dict[str, Any], global_batch: int, allow_change: bool) -> None:
    """Refuse to resume ``ckpt`` with other training settings unless ``allow_change`` (then log them)."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state["global_batch"] != global_batch:
        raise UsageError(f"--resume: {ckpt} was written with global batch {state['global_batch']} "
                         f"(batch_size × grad_accum × ranks), now {global_batch}; resume with the same shape")
    if "training_settings" not in state:
        logger.warning("%s records no training settings (written by an older version): not compared", ckpt)
        return
    changes = settings_changes(state["training_settings"], settings)
    if not changes:
        return
    listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
    if not allow_change:
        raise UsageError(f"--resume: {ckpt} was trained with other settings ({listed}); resume with the "
                         "checkpoint's values, or pass --allow_config_change to apply the new ones")
    logger.warning("--allow_config_change: resuming %s with changed settings: %s", ckpt, listed)


def _restore_schedule(optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR,
                      saved: dict[str, Any], optim: OptimConfig) -> None:
    """The checkpoint's schedule position with this run's peak lr and weight decay: the saved scheduler
    state and the optimizer's param groups hold the old ones, which matter after --allow_config_change."""
    schedule.load_state_dict({**saved, "base_lrs": [optim.lr] * len(optimizer.param_groups)})
    for group in optimizer.param_groups:
        group.update(initial_lr=optim.lr, weight_decay=optim.weight_decay)
    schedule.last_epoch -= 1
    schedule.step()  # sets every group's lr for the step at last_epoch from the new base lr


def _forward_backward(policy: PolicyLoss, micro_batches: list[MicroBatch], autocast: Any, device: torch.device,
                      progress: bool) -> torch.Tensor:
    """Loss of every micro-batch, backward on each; returns the step's summed loss (0-dim, no sync).
    ``progress``: a bar over the micro-batches on a terminal once the step has lasted 5 s."""
    loss_sum = torch.zeros((), device=device)
    for mb in tqdm(micro_batches, desc="forward/backward", unit="micro-step", delay=5, leave=False,
                   disable=None if progress else True):  # None: on a terminal only, not in a log file
        with autocast:
            loss = policy(mb.batch.input_ids, mb.batch.attention_mask, mb.batch.response_mask,
                          mb.token_weights, mb.reference) * mb.loss_scale
        loss.backward()
        loss_sum += loss.detach()
    return loss_sum


def _step_record(loss_sum: torch.Tensor, stop: bool, stats: dict[str, torch.Tensor], grad_norm: torch.Tensor,
                 env: DistEnv) -> tuple[dict[str, float], bool]:
    """The step's global loss, grad norm and statistics (means over ranks), and whether any rank was told to stop.

    Besides one per micro-step (the kept rows of the loss), the step's only host sync, at its
    boundary: one all-reduce of loss, stop request and stats, read back with the grad norm.
    """
    local = torch.stack([loss_sum / env.world, torch.tensor(float(stop), device=env.device),
                         *[v.to(env.device, torch.float32) for v in stats.values()]])
    *sums, norm = torch.cat([all_reduce_sum(local, env), grad_norm.reshape(1).to(local)]).tolist()
    loss, stops, *stat_sums = sums
    return {"loss": loss, "grad_norm": norm, **{k: v / env.world for k, v in zip(stats, stat_sums)}}, stops > 0


def train(
    cfg: TrainConfig, *, on_step: Callable[[int, dict[str, float], PolicyLoss], None] | None = None
) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; ``on_step(step, record, policy)`` runs after each step.

    Paths, data, out_dir (lock, no overwrite of a finished run) and, with ``resume``, the
    checkpoint's settings are checked before the model loads (:class:`UsageError`). Raises
    :class:`DivergenceError` (:class:`NonFiniteLossError` on a NaN/inf loss or gradient norm) from
    the divergence guard before the optimizer step, without writing a checkpoint.
    """
    cfg, pairs, settings = _checked_inputs(cfg)
    run = cfg.run
    out_dir, ckpt_root = Path(run.out_dir), Path(run.out_dir) / "checkpoints"
    # Signals are recorded from here until the lock is released and the process group is gone: a
    # SIGTERM torchrun sends to a worker still closing (after another exited 143) does not kill it.
    with (_stop_on_signals(announce=os.environ.get("RANK", "0") == "0") as received, process_group() as env,
          run_lock(out_dir) if env.rank == 0 else contextlib.nullcontext()):
        if env.rank == 0:
            claim_out_dir(out_dir, resume=run.resume, overwrite=run.overwrite,
                          has_checkpoint=latest_checkpoint(ckpt_root) is not None)
        global_batch = run.batch_size * run.grad_accum * env.world
        steps_per_epoch = len(pairs) // global_batch
        if steps_per_epoch == 0:
            raise UsageError(f"--train_jsonl {run.train_jsonl}: {len(pairs)} pairs, fewer than one global batch of "
                             f"{global_batch} (batch_size × grad_accum × ranks); lower --batch_size or --grad_accum")
        total_steps = run.epochs * steps_per_epoch
        if run.max_steps > 0:
            total_steps = min(total_steps, run.max_steps)
        last_ckpt = latest_checkpoint(ckpt_root) if run.resume else None
        if last_ckpt is not None:
            _check_resume(last_ckpt, settings, global_batch, run.allow_config_change)
        elif run.resume:
            logger.info("resume: %s holds no run yet, starting at step 0", out_dir)
        # A missing TensorBoard/W&B package stops the run here, before the model loads; rank 0 logs to it.
        reporter = Reporter(run.report_to, out_dir, cfg.to_flat())
        model, tokenizer, weights = load_for_training(run.model_name_or_path, init=cfg.parallel.init,
                                                      sharded=env.sharded, trust_remote_code=run.trust_remote_code)
        objective = make_objective(cfg, env, pairs, tokenizer)
        objective.stop_requested = lambda: _stop_agreed(bool(received), env)
        policy, optimizer, schedule = build_policy(model.train(), cfg, env, total_steps, objective.pair_loss, weights)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if env.device.type == "cuda" and not env.sharded
                    else contextlib.nullcontext())
        with autocast:
            objective.prepare(policy, out_dir)
        params = [p for p in policy.parameters() if p.requires_grad]
        guard = DivergenceGuard(cfg.guard)
        start = 0
        if last_ckpt is not None:
            state = load_checkpoint(last_ckpt, policy, optimizer)
            _restore_schedule(optimizer, schedule, state["scheduler"], cfg.optim)
            guard.load_state_dict(state.get("guard", {}))
            start = state["step"]
        if env.rank == 0:
            (out_dir / "train_config.json").write_text(json.dumps(
                {**cfg.to_flat(), "train_data_sha256": settings["train_data_sha256"]}, indent=1))
        bar = tqdm(total=total_steps, initial=start, desc=run.objective, disable=env.rank != 0 or not run.progress)
        if env.rank == 0:
            reporter.open(start, console=bar.write if run.progress else None)
        losses: list[float] = []
        stopped = None

        def checkpoint(done: int) -> Path:
            trainer_state = {"step": done, "samples_seen": done * global_batch, "global_batch": global_batch,
                             "scheduler": schedule.state_dict(), "guard": guard.state_dict(),
                             "training_settings": settings}
            return save_checkpoint(ckpt_root, done, policy, optimizer, trainer_state, keep_last=run.keep_checkpoints)

        for step in range(start, total_steps):
            t0 = time.perf_counter()
            try:
                micro_batches, stats = objective.step_batches(policy, step)
            except StopRequested:  # between micro-steps: this step is dropped, the state after the last one kept
                last_ckpt = checkpoint(step)
                stopped = received.get("signal", signal.SIGTERM)
                break
            loss_sum = _forward_backward(policy, micro_batches, autocast, env.device, objective.progress)
            grad_norm = clip_grad_norm(params, cfg.optim.max_grad_norm)
            values, stop = _step_record(loss_sum, bool(received), stats, grad_norm, env)
            record = {"step": step + 1, "epoch": step // steps_per_epoch, "loss": values.pop("loss"),
                      "grad_norm": values.pop("grad_norm"), "lr": schedule.get_last_lr()[0], **values}
            record.update(guard.check(step + 1, record["loss"], record["grad_norm"], optimizer, env,
                                      last_good=str(last_ckpt or "none (no checkpoint written yet)")))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            record["step_time_s"] = time.perf_counter() - t0
            losses.append(record["loss"])
            if env.rank == 0:
                bar.update(1)
                reporter.log(record)
            done = step + 1
            if stop or (run.save_every and done % run.save_every == 0):
                last_ckpt = checkpoint(done)
            if on_step is not None:
                on_step(done, record, policy)
            if stop:
                stopped = received.get("signal", signal.SIGTERM)  # another rank may have received it
                break
        bar.close()
        reporter.close()
        if stopped is None and run.export_hf:
            export_hf(model, tokenizer, out_dir / "final", dtype=export_dtype(run.export_dtype, env.device))
        return TrainResult(start + len(losses), losses, last_ckpt, stopped)


def run(cfg: TrainConfig) -> int:
    """:func:`train`, and the exit code: 0, or 128 + the signal that stopped the run early (its checkpoint
    written). The scripts call it through :func:`gem_fast.cli.main`, which parses and logs."""
    result = train(cfg)
    if result.stopped_by_signal is None:
        return 0
    # Checkpointed and leaving: torchrun sends SIGTERM to the workers still alive once one has exited, and
    # that must not turn this worker's 143 into death by signal while the interpreter shuts down. A no-op
    # handler, not SIG_IGN, which processes started later would inherit.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    return 128 + result.stopped_by_signal
