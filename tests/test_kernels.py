"""gem_fast.kernels against a float64 reference: values and gradients, every backend.

On CPU the Triton backend runs under the interpreter at small sizes, with vocab tiles and token
chunks made small so that every test crosses several ragged tiles and chunks; with CUDA the same
tests run at full size.
"""

from __future__ import annotations

import pytest
import torch

import gem_fast.kernels as K
from gem_fast.kernels import chunked, entropy_from_logits, fused_logprob_entropy, weighted_logprob_loss
from kernel_reference import entropy_f64, logprob_entropy_f64

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BACKENDS = ["naive", "torch", "triton"]
# (tokens, hidden, vocab): vocab is never a multiple of a tile, tokens never of a chunk.
SHAPE = (1027, 512, 50257) if CUDA else (37, 24, 300)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    if not CUDA:
        import gem_fast.kernels.triton_rows as triton_rows

        monkeypatch.setattr(triton_rows, "MAX_BLOCK_V", 64)
        # 300-wide float32 rows -> 8 tokens a chunk: 37 tokens make 5 chunks, the last ragged.
        monkeypatch.setitem(chunked.BLOCK_BYTES, "cpu", 8 * 300 * 4)


def make_inputs(case: str, dtype=torch.float32, seed=0):
    n, h, v = SHAPE
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) / h**0.5
    weight = torch.randn(v, h, generator=g) * 2
    bias = torch.randn(v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100
    if case == "one_token":
        hidden, targets = hidden[:1], torch.randint(0, v, (1,), generator=g)
    elif case == "all_ignored":
        targets = torch.full_like(targets, -100)
    elif case == "peaked":
        bias[7] = 80.0  # one logit dominates every row; other targets have logp near -80
        targets[1::3] = 7
    elif case == "all_negative":
        bias -= 1000.0  # a running max started at 0 would underflow every exp
    elif case == "batched":
        hidden, targets = hidden[:36].reshape(4, 9, h), targets[:36].reshape(4, 9)
    hidden, weight, bias, targets = (t.to(DEVICE) for t in (hidden, weight, bias, targets))
    if case == "non_contiguous":
        hidden = torch.stack([hidden, hidden], dim=-1)[..., 0]
        weight = weight.T.contiguous().T
        targets = torch.stack([targets, targets], dim=-1)[..., 0]
        assert not (hidden.is_contiguous() or weight.is_contiguous() or targets.is_contiguous())
    hidden, weight, bias = (t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias))
    return hidden, weight, bias, targets


CASES = ["basic", "one_token", "all_ignored", "peaked", "all_negative", "non_contiguous", "batched"]


def upstream(shape, seed):
    # Per-token upstream gradients, deliberately non-contiguous.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, 2, generator=g, dtype=torch.float32)[..., 0].to(DEVICE)


def close(actual, expected, scale=1.0, tol=2e-4):
    actual, expected = actual.double(), expected.double()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend, drop", [(b, False) for b in BACKENDS] + [("torch", True), ("triton", True)])
def test_logprob_entropy_matches_float64(backend, drop, case):
    hidden, weight, bias, targets = make_inputs(case)
    temperature = 0.7
    logp, entropy = fused_logprob_entropy(
        hidden, weight, targets, bias=bias, temperature=temperature, backend=backend, drop_ignored_rows=drop
    )
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == targets.shape
    ref_logp, ref_entropy = logprob_entropy_f64(hidden, weight, targets, bias, temperature)
    close(logp, ref_logp, scale=ref_logp.abs().max().item() + 1)
    close(entropy, ref_entropy)

    g_logp, g_entropy = upstream(targets.shape, 1), upstream(targets.shape, 2)
    grads = torch.autograd.grad((logp, entropy), (hidden, weight, bias), (g_logp, g_entropy))
    ref_grads = torch.autograd.grad((ref_logp, ref_entropy), (hidden, weight, bias), (g_logp, g_entropy))
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert got.dtype == want.dtype == torch.float32, name
        close(got, want, scale=want.abs().max().item() + 1e-3)
    ignored = targets == -100
    assert torch.all(logp[ignored] == 0) and torch.all(entropy[ignored] == 0)
    if ignored.all():
        assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("scale, softcap", [(0.0625, None), (1.0, 3.0), (0.5, 2.0)], ids=["cohere", "gemma", "both"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_scale_and_softcap_match_float64(backend, scale, softcap):
    # Logits of std ~2 (+ bias ~1): a cap of 2-3 bends most of them, ragged tiles and chunks included.
    hidden, weight, bias, targets = make_inputs("basic")
    kwargs = dict(bias=bias, temperature=0.7, logit_scale=scale, logit_softcap=softcap)
    logp, entropy = fused_logprob_entropy(hidden, weight, targets, backend=backend, **kwargs)
    ref = logprob_entropy_f64(hidden, weight, targets, bias, 0.7, logit_scale=scale, logit_softcap=softcap)
    close(logp, ref[0], scale=ref[0].abs().max().item() + 1)
    close(entropy, ref[1])
    g_logp, g_entropy = upstream(targets.shape, 1), upstream(targets.shape, 2)
    grads = torch.autograd.grad((logp, entropy), (hidden, weight, bias), (g_logp, g_entropy))
    ref_grads = torch.autograd.grad(ref, (hidden, weight, bias), (g_logp, g_entropy), retain_graph=True)
    for got, want in zip(grads, ref_grads):
        close(got, want, scale=want.abs().max().item() + 1e-3)
    loss = weighted_logprob_loss(hidden, weight, targets, g_logp, entropy_weights=g_entropy, backend=backend, **kwargs)
    expected = -(g_logp * ref[0]).sum() - (g_entropy * ref[1]).sum()
    close(loss, expected, scale=expected.abs().item() + 1)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight, bias)), torch.autograd.grad(expected, (hidden, weight, bias))):
        close(got, want, scale=want.abs().max().item() + 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_run_in_the_wider_one(backend):
    """A bf16 hidden with an fp32 head (TRL's cast_lm_head_to_fp32): fp32 accuracy on the bf16
    values, and each gradient in its own input's dtype."""
    hidden, weight, bias, targets = make_inputs("basic")
    hidden = hidden.detach().bfloat16().requires_grad_()
    logp, entropy = fused_logprob_entropy(hidden, weight, targets, bias=bias, backend=backend)
    ref = logprob_entropy_f64(hidden, weight, targets, bias)
    close(logp, ref[0], scale=ref[0].abs().max().item() + 1)
    close(entropy, ref[1])
    d_hidden, d_weight, d_bias = torch.autograd.grad((logp + entropy).sum(), (hidden, weight, bias))
    assert (d_hidden.dtype, d_weight.dtype, d_bias.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    (want,) = torch.autograd.grad((ref[0] + ref[1]).sum(), weight)
    close(d_weight, want, scale=want.abs().max().item())


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_loss_returns_the_stats_of_its_own_pass(backend, drop):
    hidden, weight, bias, targets = make_inputs("basic")
    w = upstream(targets.shape, 3)
    out = weighted_logprob_loss(hidden, weight, targets, w, bias=bias, backend=backend, drop_ignored_rows=drop,
                                return_stats=True)
    logp, entropy = fused_logprob_entropy(hidden, weight, targets, bias=bias, backend="naive")
    assert isinstance(out, K.LossWithStats) and not (out.logp.requires_grad or out.entropy.requires_grad)
    assert out.logp.shape == out.entropy.shape == targets.shape
    close(out.logp, logp.detach(), scale=logp.abs().max().item() + 1)
    close(out.entropy, entropy.detach())
    close(out.loss, -(w * logp).sum(), scale=(w * logp).abs().sum().item())
    (d_hidden,) = torch.autograd.grad(out.loss, hidden)
    (want,) = torch.autograd.grad(-(w * logp).sum(), hidden)
    close(d_hidden, want, scale=want.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_pass_no_gradient(backend):
    hidden, weight, bias, targets = make_inputs("basic")
    logp, entropy = fused_logprob_entropy(hidden, weight, targets, bias=bias, backend=backend)
    (d_hidden,) = torch.autograd.grad((logp + entropy).sum(), hidden)
    flat = d_hidden.reshape(-1, d_hidden.shape[-1])
    ignored = targets.reshape(-1) == -100
    assert torch.all(flat[ignored] == 0) and torch.all(flat[~ignored].abs().sum(-1) > 0)


@pytest.mark.parametrize("op", ["logprob_entropy", "weighted_loss"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_runs_the_gemms_in_the_autocast_dtype(backend, op):
    """fp32 leaves inside torch.autocast(bf16): the same numbers as bf16 inputs outside it, and
    fp32 gradients that are the bf16 ones widened (as autocast does for nn.Linear)."""
    leaves = make_inputs("basic")[:3]
    targets = make_inputs("basic")[3]
    g_logp = upstream(targets.shape, 1)

    def run(hidden, weight, bias):
        if op == "logprob_entropy":
            logp, entropy = fused_logprob_entropy(hidden, weight, targets, bias=bias, backend=backend)
            out = (logp * g_logp).sum() + entropy.sum()
        else:
            out = weighted_logprob_loss(hidden, weight, targets, g_logp, bias=bias, backend=backend)
        return out, torch.autograd.grad(out, (hidden, weight, bias))

    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, grads = run(*leaves)
    bf16_leaves = [t.detach().bfloat16().requires_grad_() for t in leaves]
    want_out, want_grads = run(*bf16_leaves)
    assert out.dtype == torch.float32 and torch.equal(out, want_out)
    for got, want in zip(grads, want_grads):
        assert got.dtype == torch.float32 and torch.equal(got, want.float())


@pytest.mark.parametrize("op", ["logprob_entropy", "weighted_loss"])
def test_ignored_rows_skip_the_logit_gemm(monkeypatch, op):
    hidden, weight, bias, targets = make_inputs("basic")
    gemm_rows = []
    block_logits = chunked._block_logits
    monkeypatch.setattr(chunked, "_block_logits", lambda h, w, b: gemm_rows.append(h.shape[0]) or block_logits(h, w, b))
    for drop in (False, True):
        gemm_rows.clear()
        if op == "logprob_entropy":
            logp, entropy = fused_logprob_entropy(hidden, weight, targets, bias=bias, backend="torch",
                                                  drop_ignored_rows=drop)
            (logp + entropy).sum().backward()
            passes = 2  # the backward recomputes the logits
        else:
            weighted_logprob_loss(hidden, weight, targets, torch.ones(targets.shape, device=DEVICE), bias=bias, backend="torch",
                                  drop_ignored_rows=drop).backward()
            passes = 1
        assert sum(gemm_rows) == passes * int((targets != -100).sum() if drop else targets.numel())


BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits


@pytest.mark.parametrize("dw_accumulation", ["input", "fp32"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_errors_stay_within_their_roundings(backend, dw_accumulation):
    """Relative RMS error against float64 on the same bf16 inputs, in units u = 2^-8.

    Log-prob and entropy see one rounding (the bf16 logits block): <= 1 u (measured <= 0.5 u).
    Gradients see three (logits, logit gradient, result): <= 3 u (measured <= 1.4 u). dW adds
    one rounding per token chunk after the first when it accumulates in bf16, a random walk:
    <= (3 + sqrt(chunks) / 2) u over >= 32 chunks (measured 1.8 u at 32 chunks, 3.1 u at 128);
    an fp32 accumulator rounds once, <= 3 u.
    """
    hidden, weight, bias, targets = make_inputs("basic", dtype=torch.bfloat16)
    n, _, v = SHAPE
    rows = max(1, n // 32)
    chunks = -(-n // rows)
    assert chunks >= 32
    g_logp, g_entropy = upstream(targets.shape, 1), upstream(targets.shape, 2)
    logp, entropy = fused_logprob_entropy(hidden, weight, targets, bias=bias, backend=backend,
                                          block_bytes=rows * v * 2, dw_accumulation=dw_accumulation)
    grads = torch.autograd.grad((logp, entropy), (hidden, weight, bias), (g_logp, g_entropy))
    ref = logprob_entropy_f64(hidden, weight, targets, bias)
    ref_grads = torch.autograd.grad(ref, (hidden, weight, bias), (g_logp, g_entropy))
    dw_bound = 3 + chunks**0.5 / 2 if dw_accumulation == "input" else 3
    bounds = {"logp": 1, "entropy": 1, "d_hidden": 3, "d_weight": dw_bound, "d_bias": 3}
    for (name, bound), got, want in zip(bounds.items(), (logp, entropy, *grads), (*ref, *ref_grads)):
        error = ((got.double() - want).norm() / want.norm()).item() / BF16_UNIT_ROUNDOFF
        assert error <= bound, (name, error, bound)
    assert grads[1].dtype == torch.bfloat16


@pytest.mark.parametrize("case", ["basic", "peaked", "non_contiguous", "batched"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("drop", [False, True])
def test_weighted_loss_equals_naive_formula(backend, case, drop):
    hidden, weight, bias, targets = make_inputs(case)
    token_weights, entropy_weights = upstream(targets.shape, 3), upstream(targets.shape, 4)
    kwargs = dict(bias=bias, temperature=1.3, entropy_weights=entropy_weights, drop_ignored_rows=drop)
    loss = weighted_logprob_loss(hidden, weight, targets, token_weights, backend=backend, **kwargs)
    logp, entropy = fused_logprob_entropy(hidden, weight, targets, bias=bias, temperature=1.3, backend="naive")
    expected = -(token_weights * logp).sum() - (entropy_weights * entropy).sum()
    assert loss.dim() == 0 and loss.dtype == torch.float32
    close(loss, expected, scale=expected.abs().item() + 1)
    # The stored gradients are scaled by the upstream gradient, here 2.5.
    grads = torch.autograd.grad(2.5 * loss, (hidden, weight, bias))
    ref_grads = torch.autograd.grad(2.5 * expected, (hidden, weight, bias))
    for got, want in zip(grads, ref_grads):
        close(got, want, scale=want.abs().max().item() + 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_loss_without_grad_and_with_frozen_weight(backend):
    hidden, weight, bias, targets = make_inputs("basic")
    token_weights = upstream(targets.shape, 5)
    with torch.no_grad():
        value = weighted_logprob_loss(hidden, weight, targets, token_weights, backend=backend)
    frozen = weight.detach()
    loss = weighted_logprob_loss(hidden, frozen, targets, token_weights, backend=backend)
    close(loss, value, scale=value.abs().item() + 1)
    (d_hidden,) = torch.autograd.grad(loss, hidden)
    ref = logprob_entropy_f64(hidden, frozen, targets)[0]
    (want,) = torch.autograd.grad(-(token_weights * ref).sum(), hidden)
    close(d_hidden, want, scale=want.abs().max().item())


def entropy_inputs(case: str, dtype=torch.float32):
    n, _, v = SHAPE
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(n, v, generator=g) * 3
    if case == "peaked":
        logits[:, 3] = 80.0
    elif case == "all_negative":
        logits -= 1000.0
    elif case == "masked_vocab":
        logits[:, ::3] = float("-inf")  # e.g. after top-k or a vocab mask
    elif case == "batched":
        logits = logits[:36].reshape(3, 12, v)
    logits = logits.to(DEVICE, dtype)
    if case == "non_contiguous":
        logits = logits.T.contiguous().T
        assert not logits.is_contiguous()
    return logits.detach().requires_grad_()


@pytest.mark.parametrize("case", ["basic", "peaked", "all_negative", "masked_vocab", "non_contiguous", "batched"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_from_logits_matches_float64(backend, case):
    logits = entropy_inputs(case)
    entropy = entropy_from_logits(logits, temperature=1.7, backend=backend)
    ref = entropy_f64(logits, temperature=1.7)
    assert entropy.dtype == torch.float32 and entropy.shape == logits.shape[:-1]
    close(entropy, ref)
    g = upstream(entropy.shape, 6)
    (got,) = torch.autograd.grad(entropy, logits, g)
    (want,) = torch.autograd.grad(ref, logits, g)
    assert torch.isfinite(got).all()
    # At full size (V=50257) the peaked rows' gradients are ~1e-13, each a difference of O(1)
    # fp32 terms (p = 1 - tiny): an absolute floor of 2e-12 (scale 1e-8), far below any real error.
    close(got, want, scale=want.abs().max().item() + 1e-8)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entropy_from_logits_bf16(backend):
    logits = entropy_inputs("basic", dtype=torch.bfloat16).detach()
    err = (entropy_from_logits(logits, backend=backend).double() - entropy_f64(logits)).abs().max()
    # bf16 inputs are exact; only the fp32 accumulation rounds.
    assert err < 1e-4


def test_triton_backend_launches_triton_kernels(monkeypatch):
    import gem_fast.kernels.triton_rows as triton_rows

    launches = []

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for name in ("_row_stats_kernel", "_row_grad_kernel", "_row_stats_and_grad_kernel"):
        monkeypatch.setattr(triton_rows, name, Counting(name, getattr(triton_rows, name)))
    hidden, weight, bias, targets = make_inputs("basic")
    logp, _ = fused_logprob_entropy(hidden, weight, targets, bias=bias, backend="triton")
    logp.sum().backward()
    assert "_row_stats_kernel" in launches and "_row_grad_kernel" in launches


def test_block_budget_from_the_keyword_the_environment_or_the_device(monkeypatch):
    monkeypatch.delenv(chunked.BLOCK_BYTES_ENV, raising=False)
    assert chunked.block_budget(torch.device("cpu")) == chunked.BLOCK_BYTES["cpu"]
    assert chunked.BLOCK_BYTES["cuda"] == 128 * 2**20
    monkeypatch.setenv(chunked.BLOCK_BYTES_ENV, "4096")
    assert chunked.block_budget(torch.device("cpu")) == 4096
    assert chunked.block_budget(torch.device("cpu"), 512) == 512
    monkeypatch.setenv(chunked.BLOCK_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match=f"^{chunked.BLOCK_BYTES_ENV}:"):
        chunked.block_budget(torch.device("cpu"))


def test_chunk_rows_count_the_element_size_and_round_to_gemm_tiles():
    llama3 = 128256
    # bf16 at 128 MiB: 523 rows fit, 512 (4 x 128) are taken on CUDA; fp32 rows are twice as big.
    assert chunked.chunk_rows(32768, llama3, 2, "cuda", 128 * 2**20) == 512
    assert chunked.chunk_rows(32768, llama3, 4, "cuda", 128 * 2**20) == 256
    assert chunked.chunk_rows(32768, llama3, 2, "cpu", 128 * 2**20) == 523
    assert chunked.chunk_rows(100, llama3, 2, "cuda", 128 * 2**20) == 100  # fewer rows than a chunk
    assert chunked.chunk_rows(32768, llama3, 2, "cuda", 10 * llama3 * 2) == 10  # less than one tile fits
    assert chunked.chunk_rows(32768, llama3, 2, "cuda", 1) == 1


def test_auto_backend_resolution():
    assert K.resolve_backend("auto", "cpu") == "torch"
    assert K.resolve_backend("auto", "cuda") == "triton"
    assert K.resolve_backend("naive", "cpu") == "naive"


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend"):
        K.resolve_backend("triton", "cpu")


def _bad_calls():
    hidden, weight, bias, targets = [t.detach() for t in make_inputs("basic")]
    n, h, v = SHAPE
    w = torch.ones(n, device=DEVICE)
    call = fused_logprob_entropy
    yield "hidden", lambda: call(hidden.long(), weight, targets)
    yield "weight", lambda: call(hidden, weight[:, :-1], targets)
    yield "weight", lambda: call(hidden, weight[None], targets)
    yield "targets", lambda: call(hidden, weight, targets[:-1])
    yield "targets", lambda: call(hidden, weight, targets.float())
    yield "bias", lambda: call(hidden, weight, targets, bias=bias[:-1])
    yield "weight", lambda: call(hidden, weight.to("meta"), targets)
    yield "temperature", lambda: call(hidden, weight, targets, temperature=0.0)
    yield "backend", lambda: call(hidden, weight, targets, backend="cuda")
    yield "token_weights", lambda: weighted_logprob_loss(hidden, weight, targets, w[:-1])
    yield "entropy_weights", lambda: weighted_logprob_loss(hidden, weight, targets, w, entropy_weights=w[1:])
    yield "logits", lambda: entropy_from_logits(torch.ones(3, 4, dtype=torch.long))
    yield "logits", lambda: entropy_from_logits(torch.ones(3, 0))
    yield "logit_scale", lambda: call(hidden, weight, targets, logit_scale=0.0)
    yield "logit_softcap", lambda: weighted_logprob_loss(hidden, weight, targets, w, logit_softcap=-30.0)
    yield "block_bytes", lambda: call(hidden, weight, targets, block_bytes=0)
    yield "block_bytes", lambda: entropy_from_logits(hidden, block_bytes=2.5)
    yield "dw_accumulation", lambda: call(hidden, weight, targets, dw_accumulation="bf16")
    if not CUDA:  # on CUDA the range check is a device-side assert (no host sync)
        too_big = targets.clone()
        too_big[3] = v
        yield "targets", lambda: call(hidden, weight, too_big)
        negative = targets.clone()
        negative[0] = -1
        yield "targets", lambda: call(hidden, weight, negative)


@pytest.mark.parametrize("argument,call", list(_bad_calls()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_names_the_argument(argument, call):
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        call()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weighted_loss_refuses_a_second_backward(backend):
    # Its stored gradients are scaled in place, so a retained graph must not be reused silently.
    hidden, weight, bias, targets = make_inputs("basic")
    loss = weighted_logprob_loss(hidden, weight, targets, upstream(targets.shape, 8), backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.slow
def test_kernels_import_alone():
    # Other RLHF code imports the kernels on their own: no transformers, and Triton only on use.
    import subprocess
    import sys

    code = "import sys, gem_fast.kernels; print(sorted(m for m in ('transformers', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("backend", ["torch", "triton"] if CUDA else ["torch"])
def test_large_vocab_reductions_keep_float32_accuracy(backend):
    # Llama-3's vocab: a sum over 128k terms must be a pairwise/tree reduction, not a running
    # dot product, or the entropy (and the gradient that uses it) loses three digits.
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(8, 64, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(128256, 64, generator=g) * 3 / 8).to(DEVICE)
    targets = torch.randint(0, 128256, (8,), generator=g).to(DEVICE)
    logp, entropy = fused_logprob_entropy(hidden, weight, targets, backend=backend)
    ref_logp, ref_entropy = logprob_entropy_f64(hidden, weight, targets)
    assert (entropy.double() - ref_entropy).abs().max() < 2e-5
    assert (logp.double() - ref_logp).abs().max() < 2e-5
    (got,) = torch.autograd.grad(entropy.sum(), hidden)
    # d_hidden = Σ_j dz_j W_j over the vocab, a BLAS GEMM in every backend. Its error, from the
    # dtype and the reduction length: dz_j carries a few roundings of size |z| (fp32 row math) and
    # the sum adds ~sqrt(V) more (any BLAS's blocked summation, probabilistically), each relative
    # to M = Σ_j |dz_j| |W_j|: |error| <= u (sqrt(V) + 4 (1 + max|z|)) M, u = 2^-24.
    z = hidden.detach().double() @ weight.double().T
    logp_all = z.log_softmax(-1)
    dz = -logp_all.exp() * (logp_all + ref_entropy[:, None])
    (want,) = torch.autograd.grad(ref_entropy.sum(), hidden)
    scale = dz.abs() @ weight.double().abs()
    bound = 2.0**-24 * (128256**0.5 + 4 * (1 + z.abs().max())) * scale
    assert torch.all((got.double() - want).abs() <= bound)
