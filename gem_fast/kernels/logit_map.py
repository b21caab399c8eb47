"""The map from raw logits x = W h + b to the logits z the softmax sees, shared by every backend.

z = softcap · tanh(scale · x / softcap) / T with soft-capping (Gemma-2/3's
``final_logit_softcapping``), z = scale · x / T without (``scale``: Cohere's ``logit_scale``).
Also the per-row statistics of z that the row passes fill only when asked (:class:`RowExtras`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LogitMap(NamedTuple):
    inv_temperature: float = 1.0
    scale: float = 1.0
    softcap: float | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """z from raw logits, out of place (differentiable: the naive backend)."""
        if self.softcap is None:
            return x * self.factor
        return torch.tanh(x * (self.scale / self.softcap)) * (self.softcap * self.inv_temperature)

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """z from raw logits, in place on ``x`` (a fresh floating copy the caller owns)."""
        if self.softcap is None:
            return x.mul_(self.factor)
        return x.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap * self.inv_temperature)

    @property
    def factor(self) -> float:
        """dz/dx without soft-capping."""
        return self.scale * self.inv_temperature

    def softcap_slope_(self, z: torch.Tensor) -> torch.Tensor:
        """dz/dx with soft-capping, from z (in place on ``z``): tanh' = 1 - tanh², tanh = z·T / softcap."""
        return z.mul_(1.0 / (self.softcap * self.inv_temperature)).square_().neg_().add_(1.0).mul_(self.factor)


class RowExtras(NamedTuple):
    """Row statistics of z besides log-sum-exp and entropy, from the same pass: [R] tensors that
    a row pass fills in place when it is handed them (TRL's ``is_top1``, ``mean_logits`` and
    ``log_sum_sq_probs``)."""

    max_logit: torch.Tensor  # float32, max_j z_j
    argmax: torch.Tensor  # int64, the first j where z_j is the max
    logit_sum: torch.Tensor  # float32, Σ_j z_j
    sum_sq_exp: torch.Tensor  # float32, Σ_j exp(2 (z_j - max)): log Σ p² = log of it - 2 (lse - max)

    @classmethod
    def empty(cls, n_rows: int, device: torch.device) -> "RowExtras":
        return cls(*(torch.empty(n_rows, dtype=dtype, device=device)
                     for dtype in (torch.float32, torch.int64, torch.float32, torch.float32)))

    def rows(self, part: slice) -> "RowExtras":
        return RowExtras(*(t[part] for t in self))
