"""Float64 ground truth for the kernel tests, written independently of gem_fast.kernels."""

from __future__ import annotations

import torch


def mapped_logits_f64(hidden, weight, bias=None, temperature=1.0, logit_scale=1.0, logit_softcap=None):
    """z / T in float64, where z = scale·(hidden @ weight.T + bias), soft-capped to cap·tanh(z / cap)
    when a cap is given."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    return z / temperature


def logprob_entropy_f64(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100,
                        logit_scale=1.0, logit_softcap=None):
    """(logp, entropy) in float64 from the exact softmax of z / T, where z = scale·(hidden @ weight.T
    + bias), soft-capped to cap·tanh(z / cap) when a cap is given."""
    z = mapped_logits_f64(hidden, weight, bias, temperature, logit_scale, logit_softcap)
    logp_all = torch.log_softmax(z, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    valid = targets != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def entropy_f64(logits, temperature=1.0):
    """Entropy of softmax(logits / T) in float64; -inf logits are masked-out vocabulary."""
    z = logits.double() / temperature
    p = torch.softmax(z, dim=-1)
    # H = lse - Σ p z, with masked entries (p = 0) kept out of both value and gradient.
    finite_z = torch.where(torch.isfinite(z), z, 0.0)
    return torch.logsumexp(z, dim=-1) - (p * finite_z).sum(-1)


def row_stats_f64(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100, logit_scale=1.0,
                  logit_softcap=None):
    """(max z, first argmax, mean z, log Σ p²) per row in float64 for the same z as
    logprob_entropy_f64; 0 on ignored rows."""
    z = mapped_logits_f64(hidden, weight, bias, temperature, logit_scale, logit_softcap)
    valid = targets != ignore_index
    top, first = z.max(dim=-1)
    log_sum_sq = torch.logsumexp(2 * torch.log_softmax(z, dim=-1), dim=-1)
    return tuple(torch.where(valid, t, 0) for t in (top, first, z.mean(-1), log_sum_sq))
