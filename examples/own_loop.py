"""The kernels in a training loop of your own: a GRPO/SEGA step on a tiny random Llama, the loss and
its gradients computed in one fused pass from the final hidden states, with that pass's log-probs
and entropy for logging.

    python examples/own_loop.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gem_fast.kernels import weighted_logprob_loss

torch.manual_seed(0)
config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

k, length, prompt_len = 4, 24, 8                    # one prompt's group of k sampled candidates
ids = torch.randint(500, (k, length))
mask = torch.ones_like(ids)
rewards = torch.tensor([1.0, 0.2, 0.5, 0.0])        # e.g. Eq. 1 scores mapped to rewards
advantages = rewards - rewards.mean()               # Eq. 2: group-mean baseline
targets = torch.cat([ids[:, 1:], ids.new_full((k, 1), -100)], 1)
targets[:, : prompt_len - 1] = -100                 # train on the response tokens only
num_tokens = (targets != -100).sum()

for step in range(3):
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    out = weighted_logprob_loss(hidden, model.lm_head.weight, targets,
                                advantages[:, None].expand_as(targets) / num_tokens, return_stats=True)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scored = targets != -100
    print(f"step {step + 1}: loss {out.loss.item():+.5f}, mean log-prob {out.logp[scored].mean().item():.3f}, "
          f"mean entropy {out.entropy[scored].mean().item():.3f}")
