"""The ``triton`` backend of :func:`gem_fast.kernels.sample_tokens`: one read of ``[R, V]`` logits.

Kernel 1 splits the rows into column chunks (enough programs to fill the GPU even at R = 4) and
reads every logit once: it keeps the online softmax statistics of z = x / T (running max ``m``,
``s = Σ e^{z-m}``, ``t = Σ e^{z-m}(z-m)``, as :mod:`triton_rows` does) and the running best of
z + g, g the Gumbel noise of :mod:`sample_rows`' hash, and writes them per chunk. Kernel 2, one
program per row on a GPU, merges the chunks into entropy and the Gumbel-max token.

Top-p (``top_p < 1``) without a sort: the answer is the argmax of z + g over the top-p set K.
Kernel 2 takes the unrestricted winner c and, in one pass over the row, sums the mass of the
tokens that precede c in the order "larger z first, lower index among equal z". If that mass is
below top_p, c is in K and, being the argmax over a superset of K, is the answer; otherwise every
token at or after c is outside K, and a second pass finds the best z + g among the tokens before
c: the next candidate. The most probable token is always accepted, so the loop ends. The check
is one read of the row (from L2 after kernel 1) without noise, and c, a draw from softmax(z),
lies in K (mass >= top_p) most of the time: then no second pass runs. After a rejection the
candidate set shrinks with every round (for equal probabilities it halves: about log2 V rounds
at worst). The same noise
is used throughout, so the token is the torch backend's up to float rounding (its sort orders
probabilities, this kernel the logits; their masses are summed in different orders).

On a machine without CUDA this module must be imported with ``TRITON_INTERPRET=1`` set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sample_rows import HASH_MULTIPLIERS, KEY2_SALT
from .triton_rows import _online_softmax_update

# Upper bound on the vocab tile; tests lower it to force ragged tiles and chunks on small vocabs.
MAX_BLOCK_V = 2048
# Kernel 1 makes about this many programs (chunks of at most MAX_TILES_PER_CHUNK tiles).
TARGET_PROGRAMS = 512
MAX_TILES_PER_CHUNK = 16
_MASK32 = tl.constexpr(0xFFFFFFFF)
_KEY2_SALT = tl.constexpr(KEY2_SALT)
_C1, _C2 = (tl.constexpr(c) for c in HASH_MULTIPLIERS)


@triton.jit
def _mix32(x):
    # The int64 form of sample_rows._mix32 (values < 2**32, products < 2**63): the same bits
    # in the interpreter and on the GPU, whatever their unsigned shift semantics.
    x = x ^ (x >> 16)
    x = (x * _C1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _C2) & _MASK32
    return x ^ (x >> 15)


@triton.jit
def _row_keys(seed_ptr, seed_stride, step_ptr, rows, row_ok):
    """sample_rows.row_keys for a block of rows: two int64 vectors, values in [0, 2**32)."""
    seed = tl.load(seed_ptr + rows * seed_stride, mask=row_ok, other=0)
    step = tl.load(step_ptr)
    key = _mix32(seed & _MASK32)
    key = _mix32(key ^ ((seed >> 32) & _MASK32))
    key = _mix32(key ^ (step & _MASK32))
    key = _mix32(key ^ ((step >> 32) & _MASK32))
    key = _mix32(key ^ rows.to(tl.int64))
    return key, _mix32(key ^ _KEY2_SALT)


@triton.jit
def _gumbel(cols, key1, key2):
    """sample_rows.gumbel_noise at these columns of these rows: float32 Gumbel(0, 1), [BLOCK_R, BLOCK_V]."""
    bits = _mix32(_mix32(cols.to(tl.int64)[None, :] ^ key1[:, None]) ^ key2[:, None])
    uniform = ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2**-24
    return -tl.log(-tl.log(uniform))


@triton.jit
def _load_z(row_base, cols, ok, factor):
    # Columns past the row read as -inf: exp(-inf) = 0 and they never win an argmax.
    x = tl.load(row_base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, x * factor, float("-inf"))


@triton.jit
def _best(score, cols, best, best_idx):
    """Running (max, argmax) per row; strictly greater, so on ties the earlier tile (lower column) keeps it."""
    tile_best, tile_idx = tl.max(score, axis=1, return_indices=True)
    better = tile_best > best
    return tl.where(better, tile_best, best), tl.where(better, (tl.min(cols, axis=0) + tile_idx).to(tl.int64), best_idx)


@triton.jit
def _precedes(z, cols, cand_z, token):
    """Whether each column comes before the row's candidate in the order "larger z, then lower index"."""
    return (z > cand_z[:, None]) | ((z == cand_z[:, None]) & (cols[None, :] < token[:, None]))


@triton.jit(do_not_specialize=["V", "n_chunks", "tiles"])
def _chunk_kernel(
    x_ptr, stride_x, seed_ptr, seed_stride, step_ptr, part_ptr, idx_ptr, R, V, n_chunks, tiles, factor,
    GREEDY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Chunk c (``tiles`` tiles) of BLOCK_R rows: (m, s, t, best score) into part[r, c, 0:4], the best column
    into idx[r, c]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    chunk = tl.program_id(1)
    row_ok = rows < R
    row_base = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    key1, key2 = _row_keys(seed_ptr, seed_stride, step_ptr, rows, row_ok)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    t = tl.zeros([BLOCK_R], tl.float32)
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_R], tl.int64)
    for tile in range(tiles):
        cols = (chunk * tiles + tile) * BLOCK_V + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < V)[None, :]
        z = _load_z(row_base, cols, ok, factor)
        m, s, t = _online_softmax_update(m, s, t, z)
        score = z if GREEDY else z + _gumbel(cols, key1, key2)
        best, best_idx = _best(score, cols, best, best_idx)
    out = part_ptr + (rows * n_chunks + chunk) * 4
    tl.store(out, m, mask=row_ok)
    tl.store(out + 1, s, mask=row_ok)
    tl.store(out + 2, t, mask=row_ok)
    tl.store(out + 3, best, mask=row_ok)
    tl.store(idx_ptr + rows * n_chunks + chunk, best_idx, mask=row_ok)


@triton.jit(do_not_specialize=["V", "n_chunks"])
def _merge_kernel(
    x_ptr, stride_x, seed_ptr, seed_stride, step_ptr, part_ptr, idx_ptr, token_ptr, entropy_ptr,
    R, V, n_chunks, factor, top_p,
    TOP_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """BLOCK_R rows: merge their chunks into entropy and token; with TOP_P, reject candidates outside top-p."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    chunks = tl.arange(0, BLOCK_S)
    ok = row_ok[:, None] & (chunks < n_chunks)[None, :]
    slot = rows[:, None] * n_chunks + chunks[None, :]
    m = tl.load(part_ptr + slot * 4, mask=ok, other=float("-inf"))
    s = tl.load(part_ptr + slot * 4 + 1, mask=ok, other=0.0)
    t = tl.load(part_ptr + slot * 4 + 2, mask=ok, other=0.0)
    best = tl.load(part_ptr + slot * 4 + 3, mask=ok, other=float("-inf"))
    # Chunks hold consecutive columns in order, so the first best chunk has the lowest column.
    _, winner = tl.max(best, axis=1, return_indices=True)
    token = tl.load(idx_ptr + rows * n_chunks + winner, mask=row_ok, other=0)
    m_row = tl.max(m, axis=1)
    alpha = tl.where(s > 0, tl.exp(m - m_row[:, None]), 0.0)
    s_row = tl.sum(s * alpha, axis=1)
    t_row = tl.sum(tl.where(s > 0, alpha * (t + (m - m_row[:, None]) * s), 0.0), axis=1)
    tl.store(entropy_ptr + rows, tl.log(s_row) - t_row / s_row, mask=row_ok)
    if TOP_P:
        row_base = x_ptr + rows.to(tl.int64)[:, None] * stride_x
        key1, key2 = _row_keys(seed_ptr, seed_stride, step_ptr, rows, row_ok)
        lse = m_row + tl.log(s_row)
        searching = row_ok
        while tl.max(searching.to(tl.int32), axis=0) > 0:
            cand_z = tl.load(x_ptr + rows.to(tl.int64) * stride_x + token, mask=row_ok, other=0.0).to(tl.float32)
            cand_z = cand_z * factor
            # The check needs no noise, and usually accepts (c is a draw from softmax(z), K holds >= top_p
            # of its mass): the noise, the costly part, is hashed only in the rounds after a rejection.
            mass = tl.zeros([BLOCK_R], tl.float32)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                z = _load_z(row_base, cols, row_ok[:, None] & (cols < V)[None, :], factor)
                mass += tl.sum(tl.where(_precedes(z, cols, cand_z, token), tl.exp(z - lse[:, None]), 0.0), axis=1)
            searching = searching & (mass >= top_p)
            if tl.max(searching.to(tl.int32), axis=0) > 0:
                next_best = tl.full([BLOCK_R], float("-inf"), tl.float32)
                next_idx = token
                for v0 in range(0, V, BLOCK_V):
                    cols = v0 + tl.arange(0, BLOCK_V)
                    z = _load_z(row_base, cols, searching[:, None] & (cols < V)[None, :], factor)
                    score = tl.where(_precedes(z, cols, cand_z, token), z + _gumbel(cols, key1, key2), float("-inf"))
                    next_best, next_idx = _best(score, cols, next_best, next_idx)
                token = tl.where(searching, next_idx, token)
    tl.store(token_ptr + rows, token, mask=row_ok)


def _launch_config(n_rows: int, vocab: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_V, tiles per chunk, chunks per row). On a GPU a program owns one row's chunk and
    kernel 1 makes about TARGET_PROGRAMS of them (R = 4 rows of a Llama-3 vocab still fill the SMs);
    the interpreter takes up to 16 rows a program to cut its per-op Python overhead."""
    block_r = 1 if on_gpu else min(16, triton.next_power_of_2(n_rows))
    block_v = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    tiles_per_row = triton.cdiv(vocab, block_v)
    programs_per_chunk = triton.cdiv(n_rows, block_r)
    tiles = max(1, min(MAX_TILES_PER_CHUNK, triton.cdiv(programs_per_chunk * tiles_per_row, TARGET_PROGRAMS)))
    return block_r, block_v, tiles, triton.cdiv(tiles_per_row, tiles)


def sample_rows(
    logits: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`gem_fast.kernels.sample_rows.sample_rows` (same arguments, same noise): two launches."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n_rows, vocab = logits.shape
    greedy = temperature == 0
    factor = 1.0 if greedy else 1.0 / temperature
    block_r, block_v, tiles, n_chunks = _launch_config(n_rows, vocab, logits.is_cuda)
    device = logits.device
    partials = torch.empty((n_rows, n_chunks, 4), dtype=torch.float32, device=device)
    best_idx = torch.empty((n_rows, n_chunks), dtype=torch.int64, device=device)
    tokens = torch.empty(n_rows, dtype=torch.int64, device=device)
    entropy = torch.empty(n_rows, dtype=torch.float32, device=device)
    seed_stride = 0 if seed.dim() == 0 else seed.stride(0)
    warps = (8 if block_v >= 2048 else 4) if logits.is_cuda else 1
    row_blocks = triton.cdiv(n_rows, block_r)
    _chunk_kernel[(row_blocks, n_chunks)](
        logits, logits.stride(0), seed, seed_stride, step, partials, best_idx, n_rows, vocab, n_chunks, tiles,
        factor, GREEDY=greedy, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=warps,
    )
    _merge_kernel[(row_blocks,)](
        logits, logits.stride(0), seed, seed_stride, step, partials, best_idx, tokens, entropy,
        n_rows, vocab, n_chunks, factor, float(top_p),
        TOP_P=not greedy and top_p < 1.0, BLOCK_R=block_r, BLOCK_S=triton.next_power_of_2(n_chunks),
        BLOCK_V=block_v, num_warps=warps,
    )
    return tokens, entropy
