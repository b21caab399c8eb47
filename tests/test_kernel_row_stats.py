"""fused_logprob_entropy(return_row_stats=True): the row max, its first argmax, the mean of z and log Σ p²
from the same pass, against float64 (every backend, ragged tiles and chunks, exact ties across vocab tiles); and
``gemm_dtype``, which fixes the logit GEMM's dtype inside autocast (TRL's cast_lm_head_to_fp32)."""

from __future__ import annotations

import pytest
import torch

from gem_fast.kernels import LogprobEntropyStats, chunked, fused_logprob_entropy
from kernel_reference import row_stats_f64
from test_kernels import BACKENDS, DEVICE, close, make_inputs, small_tiles, upstream  # noqa: F401 (fixture)


def tied_inputs():
    """make_inputs("basic") where columns 7, 9 (one vocab tile) and 250 (a later tile) give every row
    the same logit, 80: zero weight rows, equal bias, so the tie is exact whatever the GEMM's order."""
    hidden, weight, bias, targets = make_inputs("basic")
    with torch.no_grad():
        for column in (7, 9, 250):
            weight[column] = 0.0
            bias[column] = 80.0
    targets[1::4] = 9  # labels that tie with the max but are not the first maximum
    targets[2::4] = 7
    return hidden, weight, bias, targets


@pytest.mark.parametrize("case", ["basic", "peaked", "all_negative", "batched", "non_contiguous", "ties"])
@pytest.mark.parametrize("backend, drop", [(b, False) for b in BACKENDS] + [("torch", True), ("triton", True)])
def test_row_stats_match_float64_and_leave_logp_entropy_unchanged(backend, drop, case):
    hidden, weight, bias, targets = tied_inputs() if case == "ties" else make_inputs(case)
    kwargs = dict(bias=bias, temperature=0.7, backend=backend, drop_ignored_rows=drop)
    stats = fused_logprob_entropy(hidden, weight, targets, return_row_stats=True, **kwargs)
    plain = fused_logprob_entropy(hidden, weight, targets, **kwargs)
    assert isinstance(stats, LogprobEntropyStats)
    assert all(t.shape == targets.shape for t in stats) and stats.argmax.dtype == torch.int64
    want_max, want_arg, want_mean, want_sq = row_stats_f64(hidden, weight, targets, bias, 0.7)
    close(stats.max_logit, want_max, scale=want_max.abs().max().item() + 1)
    assert torch.equal(stats.argmax, want_arg)
    close(stats.mean_logit, want_mean, scale=want_mean.abs().max().item() + 1)
    close(stats.log_sum_sq_prob, want_sq, scale=want_sq.abs().max().item() + 1)
    if case == "ties":
        valid = targets != -100
        assert torch.all(stats.argmax[valid] == 7)
    # The statistics carry no gradient; log-prob and entropy, and their gradients, are those of the
    # plain call (the same pass, only more registers).
    assert not any(t.requires_grad for t in stats[2:])
    assert torch.equal(stats.logp, plain[0]) and torch.equal(stats.entropy, plain[1])
    g_logp, g_entropy = upstream(targets.shape, 1), upstream(targets.shape, 2)
    grads = torch.autograd.grad(stats[:2], (hidden, weight, bias), (g_logp, g_entropy))
    want_grads = torch.autograd.grad(plain, (hidden, weight, bias), (g_logp, g_entropy))
    for got, want in zip(grads, want_grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("scale, softcap", [(0.5, None), (1.0, 3.0)], ids=["scale", "softcap"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_stats_see_the_mapped_logits(backend, scale, softcap):
    hidden, weight, bias, targets = make_inputs("basic")
    kwargs = dict(bias=bias, temperature=0.7, logit_scale=scale, logit_softcap=softcap)
    stats = fused_logprob_entropy(hidden, weight, targets, backend=backend, return_row_stats=True, **kwargs)
    want_max, want_arg, want_mean, want_sq = row_stats_f64(hidden, weight, targets, bias, 0.7, logit_scale=scale,
                                                           logit_softcap=softcap)
    close(stats.max_logit, want_max, scale=want_max.abs().max().item() + 1)
    assert torch.equal(stats.argmax, want_arg)
    close(stats.mean_logit, want_mean, scale=1.0)
    close(stats.log_sum_sq_prob, want_sq, scale=want_sq.abs().max().item() + 1)


def test_row_stats_add_no_gemm(monkeypatch):
    hidden, weight, bias, targets = make_inputs("basic")
    gemms = []
    block_logits = chunked._block_logits
    monkeypatch.setattr(chunked, "_block_logits", lambda h, w, b: gemms.append(h.shape[0]) or block_logits(h, w, b))
    fused_logprob_entropy(hidden, weight, targets, bias=bias, backend="torch")
    plain = list(gemms)
    gemms.clear()
    fused_logprob_entropy(hidden, weight, targets, bias=bias, backend="torch", return_row_stats=True)
    assert gemms == plain and sum(plain) == targets.numel()


@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
def test_gemm_dtype_float32_inside_bf16_autocast_is_the_fp32_computation(backend):
    """TRL's cast_lm_head_to_fp32: bf16 activations and an fp32 head inside autocast(bf16) give
    exactly the numbers and gradients of the fp32 computation outside autocast."""
    hidden, weight, bias, targets = make_inputs("basic")
    hidden_bf16 = hidden.detach().bfloat16().requires_grad_()
    g_logp = upstream(targets.shape, 1)

    def run(h, **options):
        logp, entropy = fused_logprob_entropy(h, weight, targets, bias=bias, backend=backend, **options)
        return logp, entropy, (logp * g_logp).sum() + entropy.sum()

    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = run(hidden_bf16, gemm_dtype=torch.float32)
        in_bf16 = run(hidden_bf16)
    want = run(hidden_fp32 := hidden_bf16.detach().float().requires_grad_())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # Backward outside autocast, as trainers call it.
    got_grads = torch.autograd.grad(got[2], (hidden_bf16, weight, bias))
    want_grads = torch.autograd.grad(want[2], (hidden_fp32, weight, bias))
    assert got_grads[0].dtype == torch.bfloat16 and torch.equal(got_grads[0], want_grads[0].bfloat16())
    for g, w in zip(got_grads[1:], want_grads[1:]):
        assert g.dtype == torch.float32 and torch.equal(g, w)
    assert not torch.equal(in_bf16[0], want[0])  # without it the GEMM runs in bf16


def test_gemm_dtype_must_be_a_float_dtype():
    hidden, weight, _, targets = make_inputs("basic")
    with pytest.raises(ValueError, match="gemm_dtype"):
        fused_logprob_entropy(hidden, weight, targets, gemm_dtype=torch.int8)
