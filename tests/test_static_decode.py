"""gem_fast.static_decode through sample_group(strategy="static"): tokens, EOS bookkeeping, entropies, and the
properties that let a GPU capture the step (no host sync, fixed shapes, fullgraph compile) checked on the CPU."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from test_sampling import batch, entropy_recomputed, model, tokenizer  # noqa: F401 (fixtures: tiny Llama, prompts)
from torch._dynamo.testing import CompileCounter
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from gem_fast.models import tiny_llama
from gem_fast.sampling import _cache_kv, _new_cache, sample_group
from gem_fast.static_decode import StaticDecoder, static_decode_unsupported

HOST_SYNCS = {"_local_scalar_dense", "nonzero", "item"}


def _static(model, batch, **kwargs):
    out = sample_group(model, *batch, strategy="static", progress=False, **kwargs)
    assert out.strategy == "static"
    return out


@pytest.mark.parametrize("k", [1, 2, 5])
def test_greedy_equals_generate_and_the_eager_path(model, tokenizer, batch, k):
    eos, new = tokenizer.eos_token_id, 10
    out = _static(model, batch, k=k, max_new_tokens=new, temperature=0.0, eos_token_id=eos)
    hf = model.generate(*batch[:1], attention_mask=batch[1], do_sample=False, max_new_tokens=new, eos_token_id=eos,
                        pad_token_id=eos)[:, batch[0].shape[1]:]
    eager = sample_group(model, *batch, k=k, max_new_tokens=new, temperature=0.0, eos_token_id=eos,
                         strategy="shared_prefix")
    assert out.sequences.shape == eager.sequences.shape
    torch.testing.assert_close(out.sequences, F.pad(hf, (0, new - hf.shape[1]), value=eos).repeat_interleave(k, 0),
                               rtol=0, atol=0)
    torch.testing.assert_close(out.sequences, eager.sequences, rtol=0, atol=0)
    torch.testing.assert_close(out.mask, eager.mask, rtol=0, atol=0)
    torch.testing.assert_close(out.token_entropy, eager.token_entropy, rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible_from_the_generator(model, batch):
    def run(seed):
        return _static(model, batch, k=3, max_new_tokens=4, temperature=0.9, top_p=0.95,
                       generator=torch.Generator().manual_seed(seed)).sequences

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.view(3, 3, -1).unique(dim=1).shape[1] > 1  # the k candidates of a prompt differ


@pytest.mark.parametrize("k", [1, 2, 5])
def test_ragged_eos_truncates_the_same_draws(model, tokenizer, batch, k):
    """The noise depends on (seed, step, row, token) only, so adding an EOS id must cut every row at its first
    EOS and leave the rest of the draws as they were; finished rows hold padding, zero entropy, mask False."""
    new, pad = 8, tokenizer.pad_token_id
    run = lambda eos: _static(model, batch, k=k, max_new_tokens=new, temperature=1.0, eos_token_id=eos,  # noqa: E731
                              pad_token_id=pad, generator=torch.Generator().manual_seed(3))
    free = run(None)
    # EOS = the token most rows emit at some step after the first: rows finish at different steps.
    first_at = lambda t: [row.tolist().index(t) if t in row.tolist() else new for row in free.sequences]  # noqa: E731
    eos = max(free.sequences[:, 1:].unique().tolist(), key=lambda t: len({e for e in first_at(t) if e < new}))
    ends = first_at(eos)
    assert len(set(ends)) > 1, f"EOS {eos} does not give ragged ends: {ends}"
    out = run(eos)
    steps = min(new, max(ends) + 1)
    assert out.sequences.shape[1] == steps  # the steps after the last row finished are cut
    for row, end in enumerate(ends):
        valid = slice(0, end + 1)
        assert out.mask[row, valid].all() and not out.mask[row, end + 1:].any()
        torch.testing.assert_close(out.sequences[row, valid], free.sequences[row, valid], rtol=0, atol=0)
        torch.testing.assert_close(out.token_entropy[row, valid], free.token_entropy[row, valid], rtol=0, atol=0)
        assert (out.sequences[row, end + 1:] == pad).all() and (out.token_entropy[row, end + 1:] == 0).all()


@pytest.mark.parametrize("k,temperature,top_p", [(1, 0.7, 0.9), (2, 1.0, 1.0), (5, 0.0, 1.0)])
def test_entropy_equals_float64_recomputation(tokenizer, batch, k, temperature, top_p):
    """A float64 model, so the decode-time logits and one full forward agree to rounding: what is left is
    the entropy's float32 accumulation over the 49k vocabulary, well inside 1e-5."""
    model = tiny_llama(tokenizer).double()
    input_ids, attention_mask = batch
    new = 6
    out = _static(model, batch, k=k, max_new_tokens=new, temperature=temperature, top_p=top_p,
                  generator=torch.Generator().manual_seed(7))
    assert out.token_entropy.dtype == torch.float32 and out.mask.all()
    ref = entropy_recomputed(model, input_ids, attention_mask, out, temperature)
    torch.testing.assert_close(out.token_entropy.double(), ref, rtol=1e-5, atol=1e-5)


def test_prompt_kv_is_held_once_per_prompt(model, batch):
    kv = [_static(model, batch, k=k, max_new_tokens=2).prompt_kv_bytes for k in (1, 4)]
    shared = sample_group(model, *batch, k=4, max_new_tokens=2, strategy="shared_prefix").prompt_kv_bytes
    assert kv[0] == kv[1] == shared > 0


def test_unsupported_settings_fall_back_with_the_reason(model, batch, caplog, monkeypatch):
    import gem_fast.sampling as sampling

    monkeypatch.setattr(sampling, "_LOGGED", set())  # the fallback is logged once per process
    prompt_len = batch[0].shape[1]
    monkeypatch.setattr(model.config, "sliding_window", prompt_len + 4, raising=False)
    assert static_decode_unsupported(model, prompt_len, 3) is None  # a window longer than the call is full attention
    assert "sliding-window" in static_decode_unsupported(model, prompt_len, 4)
    with caplog.at_level("WARNING", logger="gem_fast.sampling"):
        out = sample_group(model, *batch, k=2, max_new_tokens=4, strategy="static")
    assert out.strategy == "expand" and "sliding-window" in caplog.text


class _StepTrace(TorchDispatchMode):
    """Per decode step: the ops run with their output shapes and dtypes; ``between`` holds ops outside steps."""

    def __init__(self):
        super().__init__()
        self.steps: list[list[tuple]] = []
        self.between: list[list[str]] = [[]]
        self.in_step = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if self.in_step:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.steps[-1].append((name, tuple((tuple(t.shape), t.dtype) for t in outs if isinstance(t, torch.Tensor))))
        else:
            self.between[-1].append(name)
        return out


def test_decode_steps_have_fixed_shapes_and_no_host_sync(model, tokenizer, batch, monkeypatch):
    """8 decode steps with an EOS id and sync_every=8: the only host syncs are the check before step 8 and the
    final trim; every step runs the same ops on the same shapes, so nothing grows with the step."""
    trace = _StepTrace()
    step = StaticDecoder.step

    def traced_step(self):
        trace.in_step = True
        trace.steps.append([])
        step(self)
        trace.in_step = False
        trace.between.append([])

    monkeypatch.setattr(StaticDecoder, "step", traced_step)
    with trace:
        out = _static(model, batch, k=2, max_new_tokens=9, temperature=0.8, top_p=0.9,
                      eos_token_id=tokenizer.eos_token_id, sync_every=8, generator=torch.Generator().manual_seed(0))
    assert out.forward_tokens == batch[0].numel() + 8 * 6
    assert len(trace.steps) == 8
    for ops in trace.steps:
        assert not HOST_SYNCS & {name for name, _ in ops}
        assert ops == trace.steps[0]
    syncs = [Counter(name for name in ops if name in HOST_SYNCS) for ops in trace.between]
    assert syncs[1:-2] == [Counter()] * 6  # between steps 1..7
    assert syncs[-2] == Counter(_local_scalar_dense=1)  # "all finished?" before step 8
    assert syncs[-1] == Counter(_local_scalar_dense=1)  # the trim to the steps that hold tokens


# Tiny random configs per family; Gemma 2 keeps its attention soft-cap and alternating sliding layers,
# with a window longer than the test's prompt + new tokens.
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "gemma2": {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 32, "attn_logit_softcapping": 5.0},
}


def _tiny_decoder(model_type: str, k: int = 2, new: int = 5) -> StaticDecoder:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  **FAMILIES[model_type])
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 300, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    assert static_decode_unsupported(model, ids.shape[1], new) is None
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=_new_cache(model), use_cache=True, logits_to_keep=1)
    decoder = StaticDecoder(model, _cache_kv(out.past_key_values), mask.bool(), mask.sum(-1), k=k, max_new_tokens=new,
                            temperature=0.8, top_p=0.9, eos=torch.tensor([5]), pad_token_id=0, seed=torch.tensor(3),
                            backend="torch", logits_kwargs={"logits_to_keep": 1})
    decoder.sample(out.logits[:, -1].repeat_interleave(k, 0))
    return decoder


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_decode_step_compiles_as_one_graph(model_type):
    """torch.compile(fullgraph=True) raises at a graph break; one frame over 3 steps: no recompile per step.
    The compiled step does what the eager step does."""
    eager, compiled = _tiny_decoder(model_type), _tiny_decoder(model_type)
    counter = CompileCounter()
    step = torch.compile(compiled.step, fullgraph=True, backend=counter)
    with torch.no_grad():
        for _ in range(3):
            eager.step()
            step()
    assert counter.frame_count == 1
    torch.testing.assert_close(compiled.sequences, eager.sequences, rtol=0, atol=0)
    torch.testing.assert_close(compiled.token_entropy, eager.token_entropy, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_decode_step_compiles_with_inductor():
    """The same step through inductor (what mode="reduce-overhead" would lower), for one family."""
    eager, compiled = _tiny_decoder("llama"), _tiny_decoder("llama")
    step = torch.compile(compiled.step, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            eager.step()
            step()
    torch.testing.assert_close(compiled.sequences, eager.sequences, rtol=0, atol=0)
    torch.testing.assert_close(compiled.token_entropy, eager.token_entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_the_eager_path(tokenizer, batch, caplog):
    """float32 on CUDA: steps 3.. replay one captured graph; greedy tokens and masks equal shared_prefix's, with
    ragged EOS (the EOS a prompt emits first) and a sync check inside the replayed steps."""
    model = tiny_llama(tokenizer).to("cuda")
    new = 12
    free = sample_group(model, *batch, k=2, max_new_tokens=new, temperature=0.0, strategy="shared_prefix")
    eos = int(free.sequences[0, 4])
    with caplog.at_level("WARNING", logger="gem_fast.static_decode"):
        out = _static(model, batch, k=2, max_new_tokens=new, temperature=0.0, eos_token_id=eos, sync_every=4)
    assert "capture failed" not in caplog.text
    eager = sample_group(model, *batch, k=2, max_new_tokens=new, temperature=0.0, eos_token_id=eos,
                         strategy="shared_prefix")
    torch.testing.assert_close(out.sequences, eager.sequences, rtol=0, atol=0)
    torch.testing.assert_close(out.mask, eager.mask, rtol=0, atol=0)
    torch.testing.assert_close(out.token_entropy, eager.token_entropy, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,expected", [("naive", "torch"), ("torch", "torch"), ("triton", "triton"),
                                              ("auto", "auto")])
def test_the_kernel_backend_reaches_sample_tokens(model, batch, monkeypatch, backend, expected):
    import gem_fast.static_decode as static_decode

    seen = []
    real = static_decode.sample_tokens

    def sample_tokens(logits, seed, step, **kwargs):
        seen.append(kwargs["backend"])
        return real(logits, seed, step, **{**kwargs, "backend": "torch"})  # the interpreter is slow at V=49k

    monkeypatch.setattr(static_decode, "sample_tokens", sample_tokens)
    _static(model, batch, k=2, max_new_tokens=3, backend=backend)
    assert seen == [expected] * 3


def test_auto_logs_its_choice_once_and_why_static_is_not_it(model, batch, caplog, monkeypatch):
    import gem_fast.sampling as sampling

    monkeypatch.setattr(sampling, "_LOGGED", set())
    with caplog.at_level("INFO", logger="gem_fast.sampling"):
        for _ in range(2):  # two micro-steps
            assert sample_group(model, *batch, k=2, max_new_tokens=1).strategy == "shared_prefix"
    choices = [r.getMessage() for r in caplog.records if "KV reuse strategy" in r.getMessage()]
    assert len(choices) == 1 and "'static' is not the default until a GPU run shows it faster" in choices[0]
