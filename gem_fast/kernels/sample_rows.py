"""One sampling step from a ``[R, V]`` logits block: the drawn token and the softmax entropy per row.

Draw: Gumbel-max, ``argmax_j (z_j + g_j)`` with z = logits / T and g_j Gumbel(0, 1), an exact draw
from softmax(z). The noise is a counter-based hash of (seed, step, row, column) rather than a
generator's stream, so a call holds no RNG state: it can be captured in a CUDA graph, compiled
with ``fullgraph=True``, and the ``torch`` and ``triton`` backends draw the same token from the
same seed (up to float ties: their ``log`` may differ in the last bit). Top-p keeps the smallest
set of most probable tokens whose mass reaches ``top_p``: a token stays while the mass of the
tokens before it in a stable descending sort is below ``top_p``, so among equal probabilities the
lower vocabulary index is kept first, and the most probable token always stays.

Entropy (nats, float32) is that of softmax(logits / T) before top-p (T = 0: of softmax(logits)),
as :class:`gem_fast.sampling.GroupSample` defines ``token_entropy``.
"""

from __future__ import annotations

import math

import torch

from . import resolve_backend

__all__ = ["HASH_MULTIPLIERS", "KEY2_SALT", "SAMPLE_BACKENDS", "gumbel_noise", "row_keys", "sample_rows",
           "sample_tokens"]

SAMPLE_BACKENDS = ("auto", "torch", "triton")
_LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Two odd multipliers below 2**31, so that a 32-bit value times one stays below 2**63: this module and
# the Triton kernel compute the 32-bit hash in int64 without overflow, so both give the same bits.
HASH_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
_MASK32 = 0xFFFFFFFF
KEY2_SALT = 0x9E3779B9  # turns the row key into a second, different one for the second hash round


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply) of int64 values in [0, 2**32)."""
    c1, c2 = HASH_MULTIPLIERS
    x = x ^ (x >> 16)
    x = (x * c1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * c2) & _MASK32
    return x ^ (x >> 15)


def row_keys(seed: torch.Tensor, step: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per row from (seed, step, row): int64 tensors [R], values in [0, 2**32).

    seed: int64 [] or [R]; step: int64 []. Both halves of the 64-bit seed and step enter the key.
    """
    rows = torch.arange(n_rows, device=seed.device, dtype=torch.int64)
    key = _mix32(seed.expand(n_rows) & _MASK32)
    for word in ((seed >> 32) & _MASK32, step & _MASK32, (step >> 32) & _MASK32, rows):
        key = _mix32(key ^ word)
    return key, _mix32(key ^ KEY2_SALT)


def gumbel_noise(key1: torch.Tensor, key2: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [R, V] float32 from the row keys [R] (see :func:`row_keys`).

    Column j of row r: h = mix(mix(j ^ key1[r]) ^ key2[r]); its top 24 bits give u in (0, 1)
    exactly in float32 (never 0 or 1), and g = -log(-log u).
    """
    columns = torch.arange(vocab, device=key1.device, dtype=torch.int64)
    bits = _mix32(_mix32(columns ^ key1[:, None]) ^ key2[:, None])
    uniform = ((bits >> 8).float() + 0.5) * 2.0**-24
    return -torch.log(-torch.log(uniform))


def _entropy(z: torch.Tensor) -> torch.Tensor:
    # Shifted by the row max: H = log s - Σ e·(z - m) / s, s = Σ e, e = exp(z - m); the unshifted
    # lse - Σ p z cancels two numbers of size |z|. -inf logits (masked vocabulary) were clamped to
    # the most negative finite value, so e = 0 and e·(z - m) = 0 rather than nan.
    shifted = z - z.amax(-1, keepdim=True)
    e = shifted.exp()
    s = e.sum(-1)
    return (torch.log(s) - (e * shifted).sum(-1) / s).float()


def _outside_top_p(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """bool [R, V]: the tokens outside the top-p set of softmax(z) (one stable sort per row)."""
    probs = torch.softmax(z, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)


def sample_rows(
    logits: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``torch`` backend of :func:`gem_fast.kernels.sample_tokens` (arguments checked there).

    logits [R, V] float; seed int64 [] or [R]; step int64 []. Returns (tokens [R] int64,
    entropy [R] float32). Works in float32 (float64 logits stay float64).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    inverse_t = 1.0 / temperature if temperature > 0 else 1.0
    z = (logits.to(dtype) * inverse_t).clamp_(min=torch.finfo(dtype).min)
    entropy = _entropy(z)
    if temperature == 0:
        return logits.argmax(-1), entropy
    key1, key2 = row_keys(seed, step, logits.shape[0])
    scores = z + gumbel_noise(key1, key2, logits.shape[1])
    if top_p < 1.0:
        scores = scores.masked_fill_(_outside_top_p(z, top_p), float("-inf"))
    return scores.argmax(-1), entropy


def sample_tokens(
    logits: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
    *,
    temperature: float,
    top_p: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logits`` and return it with the row's softmax entropy.

    logits [R, V] (bf16, fp16, fp32 or fp64); seed int64 [] (every row) or [R] (one per row), on
    the logits' device; step int64 [] on that device (the decode step: the caller advances it in
    place, so a captured graph sees new noise each replay). ``temperature`` 0 is greedy argmax
    (the first index among equal maxima); otherwise softmax(logits / T) restricted to the top-p
    set (module docstring). Returns (tokens [R] int64, entropy [R] float32 nats of
    softmax(logits / T) before top-p, T = 0: of softmax(logits)). No host sync, fixed shapes.
    ``backend``: ``torch``, ``triton`` (two launches, :mod:`gem_fast.kernels.triton_sample`) or
    ``auto`` (``triton`` on CUDA, ``torch`` elsewhere; the choice is logged once per device type).
    """
    _check_sample_args(logits, seed, step, temperature, top_p, backend)
    backend = resolve_backend(backend, logits.device)
    if backend == "triton":
        if logits.dtype == torch.float64:
            raise ValueError("logits: the triton backend takes bf16, fp16 or fp32 logits, got float64")
        from . import triton_sample  # imported on use: `import gem_fast.kernels` never loads Triton

        return triton_sample.sample_rows(logits, seed, step, float(temperature), float(top_p))
    return sample_rows(logits, seed, step, float(temperature), float(top_p))


def _check_sample_args(logits, seed, step, temperature, top_p, backend) -> None:
    if backend not in SAMPLE_BACKENDS:
        raise ValueError(f"backend: expected one of {SAMPLE_BACKENDS}, got {backend!r}")
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _LOGITS_DTYPES:
        raise ValueError(f"logits: expected a floating tensor, got {getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits: expected shape [R, V] with R, V > 0, got {tuple(logits.shape)}")
    for name, tensor, shapes in (("seed", seed, ((), (logits.shape[0],))), ("step", step, ((),))):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64:
            raise ValueError(f"{name}: expected an int64 tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}")
        if tuple(tensor.shape) not in shapes:
            raise ValueError(f"{name}: expected shape {' or '.join(map(str, shapes))}, got {tuple(tensor.shape)}")
        if tensor.device != logits.device:
            raise ValueError(f"{name}: on {tensor.device}, expected {logits.device} like logits")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p: must be in (0, 1], got {top_p!r}")
