"""A character-level Hugging Face tokenizer and a tiny Llama over it, for fast model tests."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from gem_fast.models import tiny_llama

SPECIALS = ("<pad>", "<bos>", "<eos>")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (ids 3..97) plus <pad>=0, <bos>=1, <eos>=2; no BOS added."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *string.printable[:95]])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, hidden-32 random Llama over ``tokenizer`` (float32, eval mode)."""
    return tiny_llama(tokenizer, hidden_size=32, num_layers=2, seed=seed)
