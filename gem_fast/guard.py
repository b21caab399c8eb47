"""The divergence guard: checks each optimizer step BEFORE it is applied and stops the run on a bad one.

A step is refused when its loss or gradient norm is not finite, when its gradient norm exceeds
``max_grad_norm_spike`` × the median of the last :data:`HISTORY` applied steps' norms, or when the
update AdamW is about to apply, ‖Δθ‖, exceeds ``max_update_ratio`` × ‖θ‖ (global L2 norms over
all trainable parameters, all-reduced over FSDP shards). The update is computed from the
optimizer's state and the (clipped) gradient one tensor at a time, as ``torch.optim.AdamW``
would compute it, so no parameter copy is made. The refusal raises :class:`DivergenceError`
naming the step and the figures; the caller has not stepped the optimizer, so the weights and
the last checkpoint are the last good ones.
"""

from __future__ import annotations

import collections
import math
import statistics
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from gem_fast.config import GuardConfig
from gem_fast.distributed import DistEnv, all_reduce_sum
from gem_fast.errors import FatalError

__all__ = ["DivergenceError", "NonFiniteLossError", "DivergenceGuard", "adamw_update_ratio", "HISTORY"]

HISTORY = 100  # applied steps whose gradient norms make the running median
MIN_HISTORY = 10  # steps of history before the spike check runs


class DivergenceError(FatalError, FloatingPointError):
    """A step failed the divergence guard; raised before the optimizer step touches the weights."""


class NonFiniteLossError(DivergenceError):
    """A step's loss or gradient norm was NaN/inf; raised before the optimizer step touches the weights."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def adamw_update_ratio(optimizer: torch.optim.AdamW, env: DistEnv) -> float:
    """‖Δθ‖ / ‖θ‖ of the step ``optimizer.step()`` would take now (global L2 norms, all ranks).

    Δθ = lr·(m̂ / (√v̂ + eps) + weight_decay·θ) with m, v updated by the current gradient and
    bias-corrected as torch's AdamW does (amsgrad off). Collective under FSDP; two temporaries of
    one parameter's (local shard) size at a time.
    """
    if not isinstance(optimizer, torch.optim.AdamW) or any(g["amsgrad"] for g in optimizer.param_groups):
        raise TypeError(f"the update ratio is computed for AdamW without amsgrad, got {type(optimizer).__name__}")
    sums = torch.zeros(2, device=env.device, dtype=torch.float32)  # [‖Δθ‖², ‖θ‖²]
    for group in optimizer.param_groups:
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:  # AdamW skips it
                continue
            param, grad = _local(p), _local(p.grad).float()
            state = optimizer.state.get(p, {})
            step = float(state["step"]) + 1 if state else 1.0
            if state:
                m = torch.lerp(_local(state["exp_avg"]).float(), grad, 1 - beta1)
                denom = grad.square().mul_(1 - beta2).add_(_local(state["exp_avg_sq"]).float(), alpha=beta2)
            else:
                m, denom = grad * (1 - beta1), grad.square().mul_(1 - beta2)
            denom.div_(1 - beta2**step).sqrt_().add_(eps)
            update = m.div_(denom).mul_(lr / (1 - beta1**step))
            if decay:
                update.add_(param.float(), alpha=lr * decay)
            sums[0] += update.square().sum()
            sums[1] += param.float().square().sum()
    update_sq, weight_sq = all_reduce_sum(sums, env).tolist()
    return (update_sq / weight_sq) ** 0.5 if weight_sq > 0 else float("inf") if update_sq > 0 else 0.0


class DivergenceGuard:
    """Per-step checks of :mod:`gem_fast.guard` with the limits of a :class:`GuardConfig`."""

    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.grad_norms: collections.deque[float] = collections.deque(maxlen=HISTORY)

    def check(self, step: int, loss: float, grad_norm: float, optimizer: torch.optim.AdamW, env: DistEnv,
              last_good: str) -> dict[str, float]:
        """Raise :class:`DivergenceError` if step ``step`` (1-based) must not be applied; else record its
        gradient norm and return the figures to log (``update_ratio`` when that check is on).

        ``loss`` and ``grad_norm`` are the step's global values (the same on every rank), so every
        rank decides alike; ``last_good`` names the last checkpoint for the message.
        """
        kept = f"the step was not applied; the last checkpoint is {last_good}"
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise NonFiniteLossError(f"step {step}: loss {loss}, grad norm {grad_norm}; {kept}")
        limit = self.cfg.max_grad_norm_spike
        if limit and len(self.grad_norms) >= MIN_HISTORY:
            median = statistics.median(self.grad_norms)
            if grad_norm > limit * median:
                raise DivergenceError(
                    f"step {step}: grad norm {grad_norm:.4g} is {grad_norm / median:.3g} × the median {median:.4g} "
                    f"of the last {len(self.grad_norms)} steps (limit --max_grad_norm_spike {limit:g}); {kept}")
        figures = {}
        if self.cfg.max_update_ratio:
            ratio = adamw_update_ratio(optimizer, env)
            if not ratio <= self.cfg.max_update_ratio:
                lr = optimizer.param_groups[0]["lr"]
                raise DivergenceError(
                    f"step {step}: the update's norm is {ratio:.3g} × the weights' (limit --max_update_ratio "
                    f"{self.cfg.max_update_ratio:g}; lr {lr:.3g}, grad norm {grad_norm:.4g}, loss {loss:.4g}); "
                    f"lower --lr or raise --warmup_steps; {kept}")
            figures["update_ratio"] = ratio
        self.grad_norms.append(grad_norm)
        return figures

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run checks as the uninterrupted one would."""
        return {"grad_norms": list(self.grad_norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grad_norms.extend(state.get("grad_norms", []))
