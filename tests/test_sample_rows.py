"""gem_fast.kernels.sample_tokens: entropy against float64, greedy, reproducible Gumbel-max draws,
the top-p set against a float64 sorted reference, the draw distribution, the Triton backend's
tokens against the torch backend's, and the properties a captured decode step needs (no host
sync, fixed shapes, fullgraph compile on the CPU, CUDA graph capture on CUDA).

On CPU the Triton backend runs under the interpreter with 64-wide vocab tiles and few programs,
so that every row crosses ragged tiles and several chunks.
"""

from __future__ import annotations

import math

import pytest
import torch

from gem_fast.kernels import sample_tokens
from gem_fast.kernels.sample_rows import SAMPLE_BACKENDS
from kernel_reference import entropy_f64
from op_trace import OpTrace

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BACKENDS = [b for b in SAMPLE_BACKENDS if b != "auto"]
assert BACKENDS == ["torch", "triton"]
FP32_UNIT_ROUNDOFF = 2.0**-24
# Host syncs a captured step must not contain.
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    if not CUDA:
        import gem_fast.kernels.triton_sample as triton_sample

        # 333-wide rows: 6 tiles of 64, in 2 chunks of up to 5 tiles (the second ragged).
        monkeypatch.setattr(triton_sample, "MAX_BLOCK_V", 64)
        monkeypatch.setattr(triton_sample, "TARGET_PROGRAMS", 8)


def int64(value, *shape) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.int64, device=DEVICE)


def make_logits(case: str, rows: int = 6, vocab: int = 333, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """[rows, vocab] logits; vocab is never a power of two (a tile boundary falls inside the row)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    if case == "all_negative":
        logits -= 1000.0  # a max started at 0 would underflow every exp
    elif case == "peaked":
        logits[:, 5] += 40.0
    elif case == "one_finite":
        logits = torch.full_like(logits, float("-inf"))
        logits[torch.arange(rows), torch.arange(rows) * 7 % vocab] = 1.0
    elif case == "masked_vocab":
        logits[:, ::3] = float("-inf")
    return logits.to(dtype).to(DEVICE)


def top_p_set_f64(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """bool [R, V]: the smallest set of most probable tokens whose float64 mass reaches top_p
    (ties broken by the lower index, as a stable descending sort does)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    keep_sorted = sorted_probs.cumsum(-1) - sorted_probs < top_p
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def entropy_tolerance(logits: torch.Tensor, temperature: float) -> float:
    """A bound on the float32 error of H = log s - Σ e·(z - m) / s, from exactly represented inputs.

    z = x / T rounds each logit by u·|z|, which moves H by at most u·max|z|·E_p|z - m|
    (dH/dz_j = -p_j·(z_j - E_p z)); the pairwise sums over V terms add ~u·log2(V) relative to
    their size, E_p|z - m| for the second term. A factor 4 of margin on top.
    """
    z = logits.double() / temperature
    p = torch.softmax(z, dim=-1)
    gap = torch.where(p > 0, z.amax(-1, keepdim=True) - z, 0.0)
    mean_gap = float((p * gap).sum(-1).max())
    max_abs = float(z[torch.isfinite(z)].abs().max())
    return 4 * FP32_UNIT_ROUNDOFF * ((math.log2(logits.shape[-1]) + 4) * (1 + mean_gap) + max_abs * mean_gap)


@pytest.mark.parametrize("case", ["basic", "all_negative", "peaked", "one_finite", "masked_vocab"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_matches_float64(backend, temperature, dtype, case):
    logits = make_logits(case, dtype=dtype)
    tokens, entropy = sample_tokens(logits, int64(1), int64(0), temperature=temperature, backend=backend)
    assert tokens.dtype == torch.int64 and tokens.shape == (logits.shape[0],)
    assert entropy.dtype == torch.float32 and entropy.shape == (logits.shape[0],)
    t = temperature if temperature > 0 else 1.0
    ref = entropy_f64(logits.cpu(), temperature=t)
    err = (entropy.cpu().double() - ref).abs().max().item()
    assert err <= entropy_tolerance(logits.cpu(), t), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_is_argmax_first_index_on_ties(backend, dtype):
    logits = make_logits("basic", dtype=dtype)
    logits[0, 10] = logits[0, 200] = logits[0].max() + 1  # a tie: the lower index wins
    tokens, _ = sample_tokens(logits, int64(3), int64(5), temperature=0.0, top_p=0.5, backend=backend)
    assert tokens[0].item() == 10
    assert torch.equal(tokens, logits.argmax(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_draws_are_reproducible_from_seed_and_step(backend):
    logits = make_logits("basic", rows=64)
    draw = lambda seed, step: sample_tokens(logits, seed, int64(step), temperature=1.0, backend=backend)[0]
    first = draw(int64(7), 0)
    assert torch.equal(first, draw(int64(7), 0))
    # A per-row seed tensor filled with the scalar seed is the same draw.
    assert torch.equal(first, draw(int64(7, logits.shape[0]), 0))
    # Another step, another seed, a seed differing only in its upper 32 bits: other noise
    # (most of 64 draws from ~300 plausible tokens change).
    for other in (draw(int64(7), 1), draw(int64(8), 0), draw(int64(7 + 2**32), 0)):
        assert (other != first).float().mean() > 0.5
    # Rows with equal logits and seed still draw independently (the row index enters the noise).
    same_rows = logits[:1].expand(64, -1)
    assert sample_tokens(same_rows, int64(7), int64(0), temperature=1.0, backend=backend)[0].unique().numel() > 16


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("case", ["basic", "peaked", "masked_vocab"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_draws_stay_inside_the_top_p_set(backend, case, top_p):
    logits = make_logits(case, rows=8)
    # float32 and float64 cumulative masses may order a boundary token differently: the drawn
    # token must be inside the float64 set of a slightly larger top_p.
    allowed = top_p_set_f64(logits.cpu(), 0.8, min(1.0, top_p + 1e-5))
    for step in range(40 if backend == "torch" or CUDA else 4):  # the interpreter is slow
        tokens, _ = sample_tokens(logits, int64(11), int64(step), temperature=0.8, top_p=top_p, backend=backend)
        assert allowed.gather(-1, tokens.cpu()[:, None]).all(), (step, tokens)


def bernstein_halfwidth(n: int, p: float, delta: float) -> float:
    """t with P(|Binomial(n, p) - n p| >= t) <= delta (Bernstein's inequality)."""
    log_term = math.log(2 / delta)
    var = n * p * (1 - p)
    return log_term / 3 + math.sqrt((log_term / 3) ** 2 + 2 * var * log_term)


# Under the interpreter only the top-p case (the kernel's longest path); token equality with the
# torch backend covers the others there.
FREQUENCY_CASES = [("torch", 1.0, 1.0), ("torch", 0.6, 1.0), ("torch", 1.5, 0.8), ("triton", 1.5, 0.8)] + (
    [("triton", 1.0, 1.0), ("triton", 0.6, 1.0)] if CUDA else [])


@pytest.mark.parametrize("backend,temperature,top_p", FREQUENCY_CASES)
def test_draw_frequencies_match_softmax_within_top_p(backend, temperature, top_p):
    # One logits row repeated over many rows and steps: n independent draws (rows and steps both
    # enter the hash). Each token's count must lie within Bernstein's bound of n·p with
    # delta = 1e-6 / V per token, so a test with random seeds would fail with probability <= 1e-6;
    # tokens outside the top-p set must never be drawn.
    vocab = 12
    rows, steps = (2048, 8) if backend == "torch" or CUDA else (512, 2)  # the interpreter is slow
    g = torch.Generator().manual_seed(3)
    row = torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5
    logits = row.float().expand(rows, vocab).contiguous().to(DEVICE)
    counts = torch.zeros(vocab, dtype=torch.float64)
    for step in range(steps):
        tokens, _ = sample_tokens(logits, int64(2024), int64(step), temperature=temperature, top_p=top_p,
                                  backend=backend)
        counts += torch.bincount(tokens.cpu(), minlength=vocab).double()
    keep = top_p_set_f64(row[None].float(), temperature, top_p)[0]
    p = torch.softmax(row.float().double() / temperature, -1) * keep
    p = p / p.sum()
    n = rows * steps
    assert counts[~keep].sum() == 0
    for j in range(vocab):
        assert abs(counts[j] - n * p[j]) <= bernstein_halfwidth(n, p[j].item(), 1e-6 / vocab), (j, counts, n * p)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not CUDA, reason="the interpreter copies tensors to run the kernels"))])
def test_no_host_sync_and_fixed_shapes_over_steps(backend, top_p):
    logits, seed, step = make_logits("basic"), int64(5, 6), int64(0)
    traces = []
    for _ in range(3):
        with OpTrace() as trace:
            sample_tokens(logits, seed, step, temperature=0.9, top_p=top_p, backend=backend)
            step.add_(1)  # as the decode loop advances it in place
        traces.append([(a.op, a.shape, a.dtype) for a in trace.allocations])
    assert not SYNC_OPS & {op for op, _, _ in traces[0]}
    assert traces[0] == traces[1] == traces[2]
    # The temporaries are per-row, per-[R, V] or (Triton) per-chunk: none grows with the step.
    assert all(len(shape) <= 3 and shape[:1] in ((), (6,), (333,)) for _, shape, _ in traces[0]), traces[0]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_compiles_fullgraph_on_cpu(backend):
    logits = make_logits("basic").cpu()
    seed, step = torch.tensor(9), torch.tensor(4)

    def step_fn(logits, seed, step):
        return sample_tokens(logits, seed, step, temperature=0.7, top_p=0.9, backend=backend)

    compiled = torch.compile(step_fn, fullgraph=True, backend="inductor")
    tokens, entropy = compiled(logits, seed, step)
    want_tokens, want_entropy = step_fn(logits, seed, step)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(entropy, want_entropy)


@pytest.mark.parametrize("case", ["basic", "all_negative", "peaked", "one_finite", "masked_vocab"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9), (1.3, 0.3), (1.0, 0.02)])
def test_triton_draws_the_torch_backends_token(temperature, top_p, dtype, case):
    logits = make_logits(case, dtype=dtype, rows=6 if CUDA else 4)
    seed = torch.tensor([3, -1, 2**40 + 5, 7, 0, 9][: logits.shape[0]], device=DEVICE)
    for step in (1, 2**33):
        args = (logits, seed, int64(step))
        want, want_entropy = sample_tokens(*args, temperature=temperature, top_p=top_p, backend="torch")
        got, got_entropy = sample_tokens(*args, temperature=temperature, top_p=top_p, backend="triton")
        # The same noise: the same token, unless two scores differ by float rounding only (none here).
        assert torch.equal(got, want), (step, got, want)
        assert (got_entropy - want_entropy).abs().max() <= entropy_tolerance(logits.cpu(), temperature or 1.0)


def test_triton_launches_two_kernels(monkeypatch):
    import gem_fast.kernels.triton_sample as triton_sample

    launches = []
    for name in ("_chunk_kernel", "_merge_kernel"):
        kernel = getattr(triton_sample, name)

        class Counting:
            def __getitem__(self, grid, kernel=kernel, name=name):
                launches.append(name)
                return kernel[grid]

        monkeypatch.setattr(triton_sample, name, Counting())
    sample_tokens(make_logits("basic"), int64(1), int64(0), temperature=1.0, top_p=0.9, backend="triton")
    assert launches == ["_chunk_kernel", "_merge_kernel"]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_replays_draw_the_eager_tokens(backend):
    # The decode step captures the op once and replays it while advancing ``step`` in place.
    logits, seed, step = make_logits("basic", rows=4, vocab=50_001, dtype=torch.bfloat16), int64(5, 4), int64(0)
    run = lambda: sample_tokens(logits, seed, step, temperature=0.8, top_p=0.9, backend=backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up (Triton compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, entropy = run()
    for i in range(3):
        step.fill_(i)
        graph.replay()
        want, want_entropy = run()
        assert torch.equal(tokens, want)
        torch.testing.assert_close(entropy, want_entropy)


def _bad_calls():
    logits = make_logits("basic")
    yield "backend", lambda: sample_tokens(logits, int64(1), int64(0), temperature=1.0, backend="naive")
    yield "logits", lambda: sample_tokens(logits.long(), int64(1), int64(0), temperature=1.0)
    yield "logits", lambda: sample_tokens(logits[0], int64(1), int64(0), temperature=1.0)
    yield "seed", lambda: sample_tokens(logits, int64(1).int(), int64(0), temperature=1.0)
    yield "seed", lambda: sample_tokens(logits, int64(1, 5), int64(0), temperature=1.0)
    yield "step", lambda: sample_tokens(logits, int64(1), 0, temperature=1.0)
    yield "step", lambda: sample_tokens(logits, int64(1), int64(0, 1), temperature=1.0)
    yield "temperature", lambda: sample_tokens(logits, int64(1), int64(0), temperature=-1.0)
    yield "temperature", lambda: sample_tokens(logits, int64(1), int64(0), temperature=float("nan"))
    yield "top_p", lambda: sample_tokens(logits, int64(1), int64(0), temperature=1.0, top_p=0.0)
    yield "logits", lambda: sample_tokens(logits.double(), int64(1), int64(0), temperature=1.0, backend="triton")


@pytest.mark.parametrize("argument,call", list(_bad_calls()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_names_the_argument(argument, call):
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        call()


_SM90_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import gem_fast.kernels.triton_sample as ts

common = dict(x_ptr="*bf16", stride_x="i32", seed_ptr="*i64", seed_stride="i32", step_ptr="*i64", part_ptr="*fp32",
              idx_ptr="*i64", R="i32", V="i32", n_chunks="i32", factor="fp32", BLOCK_R="constexpr", BLOCK_V="constexpr")
kernels = [(ts._chunk_kernel, dict(common, tiles="i32", GREEDY="constexpr"), dict(GREEDY=False)),
           (ts._merge_kernel, dict(common, token_ptr="*i64", entropy_ptr="*fp32", top_p="fp32", TOP_P="constexpr",
                                   BLOCK_S="constexpr"), dict(TOP_P=True, BLOCK_S=64))]
for kernel, signature, constexprs in kernels:
    signature = {name: signature[name] for name in kernel.arg_names}
    source = ASTSource(kernel, signature, constexprs=dict(constexprs, BLOCK_R=1, BLOCK_V=2048))
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8)).asm["cubin"]
print("compiled")
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_an_h100_without_one():
    # The interpreter accepts code the GPU compiler rejects (loops on tensors, int64 constants):
    # compile both kernels to sm_90 machine code (Triton ships ptxas) in a process without the interpreter.
    import os
    import subprocess
    import sys

    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # this tree's gem_fast
    done = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
