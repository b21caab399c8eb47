"""Liger-Kernel's layers (gem_fast.liger_layers): when they are chosen (auto/on/off) and what patching a
Llama model changes. Their numerics against Hugging Face's layers: test_speedups.py.

Liger's RMSNorm and SwiGLU Triton kernels do not run under the Triton interpreter, so on a CPU only
their selection and patching are tested here.
"""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_lm import char_tokenizer, tiny_model
from transformers.models.llama import modeling_llama

from gem_fast import liger_layers
from gem_fast.liger_layers import apply_liger_layers, liger_layer_names, use_liger_layers

CPU = torch.device("cpu")
ROPE = "transformers.models.llama.modeling_llama.apply_rotary_pos_emb"


def test_liger_selection_auto_on_off(monkeypatch, caplog):
    pytest.importorskip("liger_kernel")
    with caplog.at_level(logging.INFO, logger="gem_fast.liger_layers"):
        assert use_liger_layers("auto", "cpu", "llama") is False
    assert "Liger layers off (liger_layers='auto': its Triton kernels need CUDA, the device is cpu)" in caplog.text
    assert use_liger_layers("off", "cuda", "llama") is False
    with pytest.raises(ValueError, match="liger_layers='on': its Triton kernels need CUDA"):
        use_liger_layers("on", CPU, "llama")
    # CUDA: on when liger-kernel can patch the model type (no GPU needed to decide)
    assert use_liger_layers("auto", "cuda", "llama") is True
    assert use_liger_layers("on", "cuda:0", "mistral") is True
    assert use_liger_layers("auto", "cuda", "gpt2") is False
    with pytest.raises(ValueError, match="'gpt2' is not one of the Llama-layout types"):
        use_liger_layers("on", "cuda", "gpt2")
    # Liger patches MoE experts and other norm layouts differently: auto stays off, not a crash.
    for model_type in ("mixtral", "olmo2"):
        assert use_liger_layers("auto", "cuda", model_type) is False
    for model_type in liger_layers.LIGER_MODEL_TYPES:
        assert use_liger_layers("on", "cuda", model_type) is True, model_type
    with pytest.raises(ValueError, match="^liger_layers: expected"):
        use_liger_layers("yes", "cuda", "llama")
    real_find_spec = liger_layers.importlib.util.find_spec
    monkeypatch.setattr(liger_layers.importlib.util, "find_spec",
                        lambda name: None if name == "liger_kernel" else real_find_spec(name))
    assert use_liger_layers("auto", "cuda", "llama") is False
    with pytest.raises(ValueError, match="liger-kernel is not installed"):
        use_liger_layers("on", "cuda", "llama")
    with pytest.raises(ValueError, match="liger-kernel is not installed"):
        apply_liger_layers(tiny_model(char_tokenizer()))


def test_apply_liger_layers_patches_this_instance_and_rope(llama_module_restored):
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer)
    assert liger_layer_names(model) == []
    names = apply_liger_layers(model)
    layers = [f"model.layers.{i}" for i in range(2)]
    expected = [f"{p}.{n}" for p in layers for n in ("mlp", "input_layernorm", "post_attention_layernorm")]
    assert names == [*expected, "model.norm", ROPE]
    modules = dict(model.named_modules())
    for name in expected + ["model.norm"]:
        kind = "LigerSwiGLUMLP" if name.endswith("mlp") else "LigerRMSNorm"
        assert modules[name]._get_name() == kind
        assert modules[name].forward.__func__.__qualname__ == f"{kind}.forward"  # Liger's forward is what runs
    assert modeling_llama.apply_rotary_pos_emb.__module__ == "liger_kernel.transformers.rope"
    # Liger also swaps the layer classes for later models: undone, only RoPE stays module-wide.
    assert modeling_llama.LlamaRMSNorm.__module__ == modeling_llama.LlamaMLP.__module__ == modeling_llama.__name__
    assert liger_layer_names(tiny_model(tokenizer)) == [ROPE]
    # parameter names as unpatched: checkpoints and the HF export are unaffected
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in tiny_model(tokenizer).named_parameters()]
