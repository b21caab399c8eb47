"""The fused vocab kernels on their own: per-token log-probs, entropy and the SEGA/GRPO loss from
``hidden @ weight.T`` without the [tokens, vocab] logits, checked against the float64 plain computation.

    python examples/fused_kernels.py
"""

import torch

from gem_fast.kernels import entropy_from_logits, fused_logprob_entropy, weighted_logprob_loss

torch.manual_seed(0)
tokens, hidden_size, vocab = 2 * 50, 64, 1000
hidden = torch.randn(2, 50, hidden_size, requires_grad=True)  # [B, L, H]: the model's final hidden states
weight = torch.randn(vocab, hidden_size) / hidden_size**0.5   # [V, H]: the LM head
targets = torch.randint(vocab, (2, 50))                       # [B, L] int64; -100 = not scored
targets[:, :10] = -100                                        # e.g. the prompt
advantages = torch.tensor([0.7, -0.7])                        # one per sequence (SEGA's A_i, GRPO's)

logp, ent = fused_logprob_entropy(hidden, weight, targets, temperature=1.0)  # [B, L] fp32 each, 0 where ignored
scored = targets != -100
token_weights = advantages[:, None].expand_as(targets) * scored / scored.sum()
loss = weighted_logprob_loss(hidden, weight, targets, token_weights)  # -Σ w·logp
loss.backward()

# The plain computation in float64: what the kernels must match.
logits = (hidden.detach().double() @ weight.double().T)
plain_logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * scored
plain_ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
ent_of_logits = entropy_from_logits(logits.float())  # [B, L, V] -> [B, L], for logits you already hold
print(f"log-prob max error {(logp.double() - plain_logp).abs().max().item():.2e}")
print(f"entropy  max error {((ent.double() - plain_ent) * scored).abs().max().item():.2e}")
print(f"loss {loss.item():.6f}, plain {-(token_weights.double() * plain_logp).sum().item():.6f}")
assert torch.allclose(logp.double(), plain_logp, atol=1e-4)
assert torch.allclose(ent.double() * scored, plain_ent * scored, atol=1e-4)
assert torch.allclose(ent_of_logits.double(), plain_ent, atol=1e-4)
