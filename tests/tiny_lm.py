"""A character-level Hugging Face tokenizer, a tiny Llama over it, and a tiny training run's inputs, for fast tests."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch
import torch.distributed as dist

from tokenizers import Tokenizer, decoders, models
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from gem_fast.config import TrainConfig
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


def write_run_inputs(root: Path, n_pairs: int = 16) -> tuple[Path, Path]:
    """A tiny Llama + char tokenizer saved as an HF folder, and a JSONL of ``n_pairs`` arithmetic pairs."""
    tokenizer = char_tokenizer()
    model_dir = root / "tiny"
    tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = root / "pairs.jsonl"
    data.write_text("".join(
        json.dumps({"prompt": f"Q{i}: {i}+{3 * i}=", "chosen": f"{4 * i} since {i}+{3 * i}",
                    "rejected": f"{4 * i + 1}"}) + "\n"
        for i in range(n_pairs)
    ))
    return model_dir, data


def join_gloo(rank: int, world: int, port: int) -> None:
    """Make this spawned process rank ``rank`` of ``world`` in a gloo group on 127.0.0.1:``port``, with
    torchrun's environment variables and one thread (the ranks share the machine's cores)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")


def run_config(model_dir: Path, data: Path, out_dir: Path, **overrides) -> TrainConfig:
    """A short run (3 steps, lr 3e-3) of the tiny model on ``data``; ``overrides`` by flat field name."""
    base = dict(train_jsonl=str(data), out_dir=str(out_dir), model_name_or_path=str(model_dir), lr=3e-3,
                warmup_steps=1, max_steps=3, progress=False)
    return TrainConfig.from_flat({**base, **overrides})
