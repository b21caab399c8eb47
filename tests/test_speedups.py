"""Non-vocab speed-ups of the training engine: Liger-Kernel layers' numerics (their selection and patching:
test_liger_layers.py) and torch.compile per decoder layer (CPU).

Liger's RMSNorm and SwiGLU Triton kernels do not run under the Triton 3.9 interpreter (it hands
float scalar arguments to the kernel as Python floats, which have no ``.to``), so their numerics
are tested only on a GPU. Liger's RoPE kernel does run
in the interpreter: its loss and gradients are compared with Hugging Face's.
"""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_lm import char_tokenizer, tiny_model
from torch._dynamo.utils import counters
from transformers.models.llama import modeling_llama

from gem_fast.config import TrainConfig
from gem_fast.distributed import DistEnv, parallelize
from gem_fast.flags import parse_config
from gem_fast.liger_layers import apply_liger_layers, liger_layer_names
from gem_fast.policy import PolicyLoss
from gem_fast.train import build_policy

CPU = torch.device("cpu")
ROPE = "transformers.models.llama.modeling_llama.apply_rotary_pos_emb"
# fp32 on CPU, same math in another order (Triton RoPE; inductor's fused kernels).
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def _batch(vocab: int, rows: int = 2, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random ids, full attention, the last 8 tokens of each row as the response, SFT weights 1/N."""
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    response = torch.zeros(rows, length, dtype=torch.bool)
    response[:, -8:] = True
    weights = response[:, 1:].float() / response[:, 1:].sum()
    return ids, torch.ones_like(ids), response, weights


def _loss_and_grads(policy: PolicyLoss, device: torch.device = CPU) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = policy(*(t.to(device) for t in _batch(policy.model.config.vocab_size)))
    loss.backward()
    return loss.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in policy.named_parameters()}


def _assert_same(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict]) -> None:
    torch.testing.assert_close(a[0], b[0], **LOSS_TOL)
    assert a[1].keys() == b[1].keys()
    for name, grad in a[1].items():
        torch.testing.assert_close(b[1][name], grad, **GRAD_TOL, msg=lambda m: f"{name}: {m}")


def test_liger_rope_matches_hugging_face_under_the_interpreter(llama_module_restored, monkeypatch):
    tokenizer = char_tokenizer()
    reference = _loss_and_grads(PolicyLoss(tiny_model(tokenizer).train(), backend="torch"))
    model = tiny_model(tokenizer).train()
    assert apply_liger_layers(model, rms_norm=False, swiglu=False) == [ROPE]
    liger_rope, calls = modeling_llama.apply_rotary_pos_emb, []
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", lambda *a, **k: calls.append(1) or liger_rope(*a, **k))
    _assert_same(reference, _loss_and_grads(PolicyLoss(model, backend="torch")))
    assert len(calls) == 2  # one Triton RoPE per layer in the forward


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's RMSNorm and SwiGLU kernels need CUDA")
def test_liger_layers_match_hugging_face_on_cuda(llama_module_restored):
    tokenizer, cuda = char_tokenizer(), torch.device("cuda")
    reference = _loss_and_grads(PolicyLoss(tiny_model(tokenizer).to(cuda).train(), backend="torch"), cuda)
    model = tiny_model(tokenizer).to(cuda).train()
    assert len(apply_liger_layers(model)) == 8  # 5 norms, 2 MLPs, RoPE
    _assert_same(reference, _loss_and_grads(PolicyLoss(model, backend="torch"), cuda))


def test_build_honours_liger_layers_flag(caplog):
    cpu_one = DistEnv.single(CPU)
    with pytest.raises(ValueError, match="liger_layers='on': its Triton kernels need CUDA"):
        build_policy(tiny_model(char_tokenizer()), TrainConfig.from_flat({"liger_layers": "on"}), cpu_one, 1)
    with caplog.at_level(logging.INFO):
        policy, _, _ = build_policy(tiny_model(char_tokenizer()), TrainConfig(), cpu_one, 1)
    assert liger_layer_names(policy.model) == []
    assert "Liger layers off" in caplog.text and "compiled layers off" in caplog.text
    cfg = parse_config(["--liger_layers", "off", "--compile_layers"], objective="sft", description="t")
    assert (cfg.parallel.liger_layers, cfg.parallel.compile_layers) == ("off", True)


def test_compile_layers_keep_loss_grads_and_names():
    """Inductor on CPU (about 20 s to compile the shared layer graph, forward and backward)."""
    tokenizer = char_tokenizer()
    torch._dynamo.reset()
    counters.clear()
    results, names = [], []
    for compiled in (False, True):
        policy = parallelize(PolicyLoss(tiny_model(tokenizer).train(), backend="torch"), activation_checkpointing=True,
                             sharded=False, device=CPU, compile_layers=compiled)
        results.append(_loss_and_grads(policy))
        names.append(list(policy.state_dict()))
        assert all((layer._compiled_call_impl is not None) == compiled for layer in policy.model.model.layers)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # whole layers compiled
    _assert_same(*results)
    assert names[0] == names[1]  # checkpoints and the HF export see the same parameter names
