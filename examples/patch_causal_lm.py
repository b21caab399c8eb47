"""One line for a Hugging Face causal LM: ``patch_causal_lm`` makes its forward return per-token
log-probs and entropy computed inside the model's own forward (no logits), here on a tiny random
Llama, checked against log_softmax of the model's own logits.

    python examples/patch_causal_lm.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gem_fast.integrations import patch_causal_lm, unpatch_causal_lm

torch.manual_seed(0)
config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(500, (2, 24))
mask = torch.ones_like(ids)
scored = torch.zeros_like(ids, dtype=torch.bool)
scored[:, 8:] = True  # the response tokens

with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=mask).logits  # the plain path, for the check below

patch_causal_lm(model)  # in place; unpatch_causal_lm undoes it
# Position t scores token t+1 (the last position has none): -100 marks what is not scored.
targets = torch.cat([ids[:, 1:], ids.new_full((len(ids), 1), -100)], 1).masked_fill(~scored, -100)
with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, logprob_targets=targets, temperature=0.7)
print(out.logprobs.shape, out.entropy.shape)  # [B, L] fp32 each, no logits anywhere

keep = targets != -100
plain = (logits.double() / 0.7).log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
error = (out.logprobs.double() - plain)[keep].abs().max().item()
print(f"log-prob max error against log_softmax(logits / 0.7): {error:.2e}")
assert error < 1e-4
unpatch_causal_lm(model)
