"""Every aten op a call runs, with its GEMM operands and the tensors it allocates (TorchDispatchMode).

Works on meta tensors too, so the kernels' GPU-path properties (operand dtypes, FLOPs, the size
of every temporary, the peak of live allocations) can be checked at full size on a CPU.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# aten GEMMs -> (index of the left operand, index of the right operand) in their args.
GEMM_OPERANDS = {"mm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2)}


@dataclass
class Gemm:
    op: str
    dtypes: tuple[torch.dtype, torch.dtype]
    out_dtype: torch.dtype
    flops: int  # 2·m·k·n


@dataclass
class Allocation:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class OpTrace(TorchDispatchMode):
    """Records GEMMs and fresh outputs (not views, not in-place or ``out=`` results); ``peak_bytes``
    is the most bytes of those outputs alive at once (freed when their tensor is), leaving out
    the allocations ``uncounted`` picks (e.g. the gradients a call returns)."""

    uncounted: Callable[[Allocation], bool] = lambda allocation: False
    gemms: list[Gemm] = field(default_factory=list)
    allocations: list[Allocation] = field(default_factory=list)
    live_bytes: int = 0
    peak_bytes: int = 0

    def __post_init__(self):
        super().__init__()

    def _free(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in GEMM_OPERANDS:
            left, right = (args[i] for i in GEMM_OPERANDS[name])
            result = out if isinstance(out, torch.Tensor) else out[0]
            self.gemms.append(Gemm(name, (left.dtype, right.dtype), result.dtype,
                                   2 * left.shape[0] * left.shape[1] * right.shape[1]))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    record = Allocation(name, tuple(tensor.shape), tensor.dtype)
                    self.allocations.append(record)
                    if self.uncounted(record):
                        continue
                    self.live_bytes += record.nbytes
                    self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                    weakref.finalize(tensor, self._free, record.nbytes)
        return out

    @property
    def gemm_flops(self) -> int:
        return sum(g.flops for g in self.gemms)
