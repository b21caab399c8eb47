"""The three benchmarked operations: their inputs, one measured call, the float64 reference, the work counted.

* ``entropy``          entropy_from_logits on ``[N, V]`` logits;
* ``logprob_entropy``  fused_logprob_entropy from ``hidden [N, H]`` and ``weight [V, H]``;
* ``weighted_loss``    weighted_logprob_loss with unit token weights, which makes it the summed
  cross-entropy that Liger-Kernel's fused linear cross entropy and cut-cross-entropy compute,
  so all providers produce the same scalar.

The plain-torch formulations here are the "naive" peer, the function torch.compile compiles and
(in float64) the reference. Logits are upcast as users do before a softmax; float64 stays float64.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

OPS = ("entropy", "logprob_entropy", "weighted_loss")
LINEAR_OPS = ("logprob_entropy", "weighted_loss")  # from hidden and weight
MODES = ("fwd", "fwd+bwd")
ERR_TOKENS = 64  # tokens in the float64 error check
# GEMM FLOPs counted per token·H·V, the same for every provider of an op: the forward is one
# logit GEMM (2); weighted_loss forward+backward needs 6 in one pass; logprob_entropy 8, since its
# upstream gradients are unknown in the forward and a memory-bounded path recomputes the logits.
FLOPS_PER_NHV = {("logprob_entropy", "fwd"): 2, ("weighted_loss", "fwd"): 2,
                 ("logprob_entropy", "fwd+bwd"): 8, ("weighted_loss", "fwd+bwd"): 6}


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def torch_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy [N] with softmax + log_softmax + sum over the full logits [N, V]."""
    z = _upcast(logits)
    return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)


def torch_logprob_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-prob [N] and entropy [N] from the full ``[N, V]`` logits."""
    logp = torch.log_softmax(_upcast(hidden @ weight.T), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy


def torch_weighted_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor
) -> torch.Tensor:
    """Scalar ``-Σ w_t logp_t`` from the full ``[N, V]`` logits."""
    logp = torch.log_softmax(_upcast(hidden @ weight.T), -1).gather(-1, targets[:, None]).squeeze(-1)
    return -(token_weights * logp).sum()


NAIVE_FNS: dict[str, Callable] = {
    "entropy": torch_entropy,
    "logprob_entropy": torch_logprob_entropy,
    "weighted_loss": torch_weighted_loss,
}


def make_inputs(op: str, tokens: int, vocab: int, hidden: int, dtype: torch.dtype,
                device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """The op's arguments: ``[logits]`` or ``[hidden, weight, targets, token_weights]``.

    Logits have a standard deviation of about 3, like a trained LM head's.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    like = {"generator": gen, "device": device, "dtype": dtype}
    if op == "entropy":
        return [torch.randn(tokens, vocab, **like) * 3]
    h = torch.randn(tokens, hidden, **like)
    w = torch.randn(vocab, hidden, **like) * (3 / math.sqrt(hidden))
    targets = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    return [h, w, targets, torch.ones(tokens, device=device)]


def leaves(op: str, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """The differentiable inputs: the logits, or hidden and weight."""
    return args[:1] if op == "entropy" else args[:2]


def grad_bytes(op: str, mode: str, args: list[torch.Tensor]) -> int:
    """Bytes of the gradients a call returns (in its leaves' dtypes): outputs, not working memory."""
    return 0 if mode == "fwd" else sum(leaf.numel() * leaf.element_size() for leaf in leaves(op, args))


def _outputs(op: str, out: object) -> dict[str, torch.Tensor]:
    if op == "entropy":
        return {"entropy": out}
    if op == "logprob_entropy":
        return {"logp": out[0], "entropy": out[1]}
    return {"loss": out}


def _grad_names(op: str) -> tuple[str, ...]:
    return ("d_logits",) if op == "entropy" else ("d_hidden", "d_weight")


def make_step(fn: Callable, op: str, mode: str, args: list[torch.Tensor]) -> Callable[[], dict]:
    """One measured call: the forward under no_grad, or forward and backward of the sum of the
    outputs (for logprob_entropy, upstream gradient 1 on both log-prob and entropy)."""
    for leaf in leaves(op, args):
        leaf.requires_grad_(mode == "fwd+bwd")

    def step() -> dict[str, torch.Tensor]:
        if mode == "fwd":
            with torch.no_grad():
                return _outputs(op, fn(*args))
        outs = _outputs(op, fn(*args))
        sum(o.float().sum() for o in outs.values()).backward()
        return outs

    return step


def drop_grads(op: str, args: list[torch.Tensor]) -> None:
    """Forget the gradients of the op's differentiable inputs (before each measured call)."""
    for leaf in leaves(op, args):
        leaf.grad = None


def _with_grads(op: str, outs: dict, args: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    grads = {n: leaf.grad for n, leaf in zip(_grad_names(op), leaves(op, args)) if leaf.grad is not None}
    return {**outs, **grads}


def reference(op: str, args: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Outputs and gradients in float64 from the plain formulas, on the given (small) inputs."""
    f64 = [a.detach().double() if a.is_floating_point() else a for a in args]
    step = make_step(NAIVE_FNS[op], op, "fwd+bwd", f64)
    return {k: v.detach() for k, v in _with_grads(op, step(), f64).items()}


def error_slice(op: str, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """The first ``ERR_TOKENS`` tokens of the op's inputs (the whole weight), as fresh leaves."""
    n = min(ERR_TOKENS, args[0].shape[0])
    if op == "entropy":
        return [args[0][:n].detach().clone()]
    h, w, t, tw = args
    return [h[:n].detach().clone(), w.detach().clone(), t[:n], tw[:n]]


def max_errors(fn: Callable, op: str, mode: str, args: list[torch.Tensor],
               ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs error of each output (and gradient, forward+backward) against ``ref``."""
    sliced = error_slice(op, args)
    got = _with_grads(op, make_step(fn, op, mode, sliced)(), sliced)
    return {k: float((v.detach().double() - ref[k].to(v.device)).abs().max()) for k, v in got.items()}


def throughput(op: str, mode: str, tokens: int, vocab: int, hidden: int, dtype: torch.dtype,
               seconds: float, matmul_tflops: float, copy_gbps: float) -> tuple[float, str, float]:
    """``(rate, unit, fraction of the device rate)``: TFLOP/s of the counted GEMM FLOPs
    (:data:`FLOPS_PER_NHV`) against the matmul rate, or for entropy the GB/s of the logits bytes
    a perfect kernel moves (read; forward+backward: read twice, write the gradient) against the copy rate."""
    if op == "entropy":
        moved = (1 if mode == "fwd" else 3) * tokens * vocab * dtype.itemsize
        gbps = moved / seconds / 1e9
        return gbps, "GB/s", gbps / copy_gbps
    tflops = FLOPS_PER_NHV[op, mode] * tokens * hidden * vocab / seconds / 1e12
    return tflops, "TFLOP/s", tflops / matmul_tflops
