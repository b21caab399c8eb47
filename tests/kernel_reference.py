"""Float64 ground truth for the kernel tests, written independently of gem_fast.kernels."""

from __future__ import annotations

import torch


def logprob_entropy_f64(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100):
    """(logp, entropy) in float64 from the exact softmax of (hidden @ weight.T + bias) / T."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
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
