import os

import pytest

# Triton kernels run under the interpreter on machines without CUDA; the variable must be set
# before any @triton.jit function is defined, i.e. before gem_fast.kernels' Triton module loads.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard requirement
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests run tiny models whose ops are too small for two OpenMP threads to pay off; one thread
# per process is several times faster here. Subprocess-based tests (peak RSS) keep their default.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    """The character-level test tokenizer (tests/tiny_lm.py), one per test module."""
    from tiny_lm import char_tokenizer  # imported here: after TRITON_INTERPRET is set above

    return char_tokenizer()


@pytest.fixture
def llama_module_restored(monkeypatch):
    """Puts Liger's process-wide patches of modeling_llama back after the test (RoPE, layer classes)."""
    pytest.importorskip("liger_kernel")  # an optional dependency
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A saved tiny model and its training pairs (tests/tiny_lm.py), ``(model_dir, data)``, one per test module."""
    from tiny_lm import write_run_inputs

    return write_run_inputs(tmp_path_factory.mktemp("inputs"))
