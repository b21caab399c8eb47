"""gem_fast.sampling.sample_group (its three strategies) on the tiny random Llama (one test on SmolLM2)."""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
import torch.nn.functional as F
from smollm2 import smollm2_model, smollm2_tokenizer
from kernel_reference import entropy_f64

from gem_fast.models import tiny_llama
from gem_fast.sampling import sample_group

STRATEGIES = ["shared_prefix", "expand", "static"]
DROPPING = ["shared_prefix", "expand"]  # finished rows leave the batch (static masks them instead)
PROMPTS = [
    "Question: what is the capital of France? Think step by step.",
    "Hi",
    "Solve 12 * 7 and explain.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer)


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Left-padded prompts of mixed lengths (one of a single token besides none)."""
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert enc.attention_mask.sum(1).unique().numel() == len(PROMPTS)  # lengths really differ
    return enc.input_ids, enc.attention_mask


def _pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value)


def _greedy_reference(model, input_ids, attention_mask, max_new_tokens, eos):
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return _pad_to(out[:, input_ids.shape[1] :], max_new_tokens, eos)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_greedy_equals_generate_tiny(model, tokenizer, batch, strategy):
    input_ids, attention_mask = batch
    eos, k, new = tokenizer.eos_token_id, 2, 10
    ref = _greedy_reference(model, input_ids, attention_mask, new, eos)
    assert all(len(set(row.tolist())) > 3 for row in ref)  # the model does not just repeat one token
    out = sample_group(
        model, input_ids, attention_mask, k=k, max_new_tokens=new, temperature=0.0, eos_token_id=eos, strategy=strategy
    )
    assert out.strategy == strategy
    got = _pad_to(out.sequences, new, eos)
    torch.testing.assert_close(got, ref.repeat_interleave(k, dim=0), rtol=0, atol=0)


@pytest.mark.slow
def test_greedy_equals_generate_smollm2():
    """The one test on the real 135M model: token-for-token equality with HF greedy, mixed lengths."""
    model, tokenizer = smollm2_model(), smollm2_tokenizer()
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    eos, k, new = tokenizer.eos_token_id, 2, 8
    ref = _greedy_reference(model, enc.input_ids, enc.attention_mask, new, eos)
    out = sample_group(
        model, enc.input_ids, enc.attention_mask, k=k, max_new_tokens=new, temperature=0.0, eos_token_id=eos
    )
    assert out.strategy == "shared_prefix"  # what "auto" picks for Llama
    torch.testing.assert_close(_pad_to(out.sequences, new, eos), ref.repeat_interleave(k, dim=0), rtol=0, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_seeded_sampling_is_reproducible(model, batch, strategy):
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return sample_group(
            model, *batch, k=3, max_new_tokens=5, temperature=0.9, top_p=0.95, generator=gen, strategy=strategy
        ).sequences

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.view(3, 3, -1).unique(dim=1).shape[1] > 1  # the k candidates of a prompt differ


def test_first_step_distribution_matches_tempered_top_p(model, tokenizer):
    """Chi-square of 1000 first-step draws (the k candidates of one prompt) vs softmax(logits / T) on the nucleus."""
    temperature, top_p, draws = 0.5, 0.8, 1000
    ids = tokenizer(["The quick brown fox"], return_tensors="pt").input_ids
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1].double() / temperature, -1)
    sorted_p, order = probs.sort(descending=True)
    nucleus = order[(sorted_p.cumsum(0) - sorted_p) < top_p]
    expected = draws * probs[nucleus] / probs[nucleus].sum()  # descending
    assert 10 <= nucleus.numel() <= 200  # a nucleus the sample size can resolve

    gen = torch.Generator().manual_seed(1234)
    out = sample_group(model, ids, None, k=draws, max_new_tokens=1, temperature=temperature, top_p=top_p, generator=gen)
    samples = out.sequences[:, 0]
    inside = torch.isin(samples, nucleus)
    assert inside.all(), f"{(~inside).sum()} draws outside the top-p nucleus"
    counts = (samples[:, None] == nucleus[None, :]).sum(0).double()
    # Tokens expected fewer than 5 times share one bin, as the chi-square approximation needs.
    small = expected < 5
    counts = torch.cat([counts[~small], counts[small].sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    dof = counts.numel() - 1
    # chi2 has mean dof and sd sqrt(2 dof): 5 sd is a p < 1e-5 bound against flakiness.
    assert chi2 < dof + 5 * math.sqrt(2 * dof), f"chi2={chi2:.1f} for {dof} dof"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_prompt_is_processed_once(model, batch, strategy):
    input_ids, attention_mask = batch
    b, p = input_ids.shape
    k, new = 4, 5
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: seen.append(args[0].numel()))
    try:
        out = sample_group(model, input_ids, attention_mask, k=k, max_new_tokens=new, strategy=strategy)
    finally:
        hook.remove()
    # Prefill once (B*P), then one token per row per decode step; the last sampled token is never fed.
    assert seen[0] == b * p
    assert sum(seen) == b * p + b * k * (new - 1) == out.forward_tokens
    assert sum(seen) < k * b * p


@pytest.mark.parametrize("strategy", DROPPING)
def test_finished_prompts_stop_costing_compute(model, tokenizer, batch, strategy):
    """A prompt whose k candidates all hit EOS leaves the batch; masks stop at EOS, padding after."""
    input_ids, attention_mask = batch
    b, p = input_ids.shape
    k, new, pad = 3, 8, tokenizer.pad_token_id
    free = sample_group(model, input_ids, attention_mask, k=k, max_new_tokens=new, temperature=0.0).sequences[::k]
    # EOS = a token that prompt 0 emits first at step e > 0 and no other prompt emits at all.
    e, eos = next(
        (e, int(t)) for e, t in enumerate(free[0].tolist()) if e > 0 and t not in free[0, :e] and t not in free[1:]
    )
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: seen.append(args[0].numel()))
    try:
        out = sample_group(
            model, input_ids, attention_mask, k=k, max_new_tokens=new, temperature=0.0, eos_token_id=eos,
            pad_token_id=pad, strategy=strategy,
        )
    finally:
        hook.remove()
    assert sum(seen) == out.forward_tokens == b * p + k * e + (b - 1) * k * (new - 1)
    first = slice(0, k)
    assert out.mask[first, : e + 1].all() and not out.mask[first, e + 1 :].any()
    assert (out.sequences[first, e] == eos).all() and (out.sequences[first, e + 1 :] == pad).all()
    assert (out.token_entropy[first, e + 1 :] == 0).all() and (out.token_entropy[first, : e + 1] > 0).all()
    assert out.mask[k:].all()
    torch.testing.assert_close(out.sequences[k:], free[1:].repeat_interleave(k, 0), rtol=0, atol=0)


@pytest.mark.parametrize("temperature,top_p,strategy", [(0.7, 0.9, "shared_prefix"), (0.0, 1.0, "expand")])
def test_entropy_equals_float64_recomputation(model, batch, temperature, top_p, strategy):
    input_ids, attention_mask = batch
    k, new = 2, 6
    gen = torch.Generator().manual_seed(7)
    out = sample_group(
        model, input_ids, attention_mask, k=k, max_new_tokens=new, temperature=temperature, top_p=top_p,
        generator=gen, strategy=strategy,
    )
    assert out.token_entropy.dtype == torch.float32 and out.mask.all()
    ref = entropy_recomputed(model, input_ids, attention_mask, out, temperature)
    torch.testing.assert_close(out.token_entropy.double(), ref, rtol=1e-4, atol=1e-4)


def entropy_recomputed(model, input_ids, attention_mask, out, temperature: float) -> torch.Tensor:
    """Float64 entropies [B*k, T] of ``out``'s steps from one full forward over prompt + generated tokens
    (the logits at position P-1+t predict token t); every generated token must be valid."""
    k, new = out.sequences.shape[0] // input_ids.shape[0], out.sequences.shape[1]
    full_ids = torch.cat([input_ids.repeat_interleave(k, 0), out.sequences], 1)
    full_mask = torch.cat([attention_mask.repeat_interleave(k, 0), out.mask.long()], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
    p = input_ids.shape[1]
    return entropy_f64(logits[:, p - 1 : p - 1 + new], temperature if temperature > 0 else 1.0)


def test_prompt_kv_memory_is_independent_of_k(model, batch):
    def kv_bytes(k, strategy):
        return sample_group(model, *batch, k=k, max_new_tokens=2, strategy=strategy).prompt_kv_bytes

    shared = kv_bytes(1, "shared_prefix")
    assert shared == kv_bytes(4, "shared_prefix") == kv_bytes(4, "static") > 0
    assert kv_bytes(4, "expand") == 4 * shared


def test_bfloat16_model(tokenizer, batch):
    """bf16 weights: every path runs, entropy stays float32, the first step (from the shared prefill) agrees."""
    model = tiny_llama(tokenizer).to(torch.bfloat16)
    outs = [sample_group(model, *batch, k=2, max_new_tokens=4, temperature=0.0, strategy=s) for s in STRATEGIES]
    for out in outs:
        assert out.token_entropy.dtype == torch.float32 and torch.isfinite(out.token_entropy).all()
    torch.testing.assert_close(outs[0].sequences[:, 0], outs[1].sequences[:, 0], rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16_strategies_agree(tokenizer, batch):
    """bf16 on CUDA (``static`` replays its captured graph for the last 3 of the 6 tokens)."""
    model = tiny_llama(tokenizer).to("cuda", torch.bfloat16)
    gen = {s: torch.Generator("cuda").manual_seed(0) for s in STRATEGIES}
    outs = {
        s: sample_group(model, *batch, k=4, max_new_tokens=6, temperature=0.0, generator=gen[s], strategy=s)
        for s in STRATEGIES
    }
    assert outs["shared_prefix"].sequences.is_cuda
    # bf16 rounding differs between the attention paths; the first steps must agree.
    for s in ("expand", "static"):
        torch.testing.assert_close(outs["shared_prefix"].sequences[:, :2], outs[s].sequences[:, :2], rtol=0, atol=0)


def test_progress_bar(model, batch, capsys):
    sample_group(model, *batch, k=1, max_new_tokens=3, progress=True)
    assert "sample_group" in capsys.readouterr().err
    sample_group(model, *batch, k=1, max_new_tokens=3, progress=False)
    assert "sample_group" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "change,argument",
    [
        (dict(attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]])), "input_ids"),  # empty prompt
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long), attention_mask=None), "input_ids"),
        (dict(k=0), "k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=8190), "max_new_tokens"),  # prompt + new tokens beyond the 8192 context
        (dict(input_ids=torch.ones(1, 8193, dtype=torch.long), attention_mask=None), "input_ids"),  # prompt > context
        (dict(attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])), "attention_mask"),  # right padding
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(eos_token_id=10**6), "eos_token_id"),
        (dict(strategy="beam"), "strategy"),
        (dict(strategy="static", sync_every=0), "sync_every"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(model, change, argument):
    kwargs = dict(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3, dtype=torch.long))
    kwargs.update(k=2, max_new_tokens=4)
    kwargs.update(change)
    with pytest.raises(ValueError, match=f"^{argument}"):
        sample_group(model, **kwargs)


def test_fsdp2_parameters_gathered_once(tokenizer, batch):
    """FSDP2 (world size 1, gloo): one unshard per parameter group for the whole call, same tokens."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with gloo and no process group already running")
    reference = sample_group(tiny_llama(tokenizer), *batch, k=2, max_new_tokens=6, temperature=0.0)
    with tempfile.NamedTemporaryFile() as store:
        dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
        try:
            model = tiny_llama(tokenizer)
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
            groups = [g for m in fsdp_modules for g in m._get_fsdp_state()._fsdp_param_groups]
            unshards = []
            original = FSDPParamGroup._to_unsharded

            def counting(group):
                unshards.append(group)
                return original(group)

            FSDPParamGroup._to_unsharded = counting
            try:
                out = sample_group(model, *batch, k=2, max_new_tokens=6, temperature=0.0)
            finally:
                FSDPParamGroup._to_unsharded = original
            assert len(unshards) == len(groups) == 3  # two layers + root, not once per decode step
            assert all(g.is_sharded for g in groups)  # parameters resharded after sampling
            torch.testing.assert_close(out.sequences, reference.sequences, rtol=0, atol=0)
        finally:
            dist.destroy_process_group()


def test_policy_samples_with_its_kernel_backend(model, batch, monkeypatch):
    """--kernel_backend reaches the sampler's per-step entropy through PolicyLoss.sample."""
    import gem_fast.sampling as sampling
    from gem_fast.policy import PolicyLoss

    backends = []

    def entropy_from_logits(logits, **kwargs):
        backends.append(kwargs["backend"])
        return real(logits, **kwargs)

    real = sampling.entropy_from_logits
    monkeypatch.setattr(sampling, "entropy_from_logits", entropy_from_logits)
    PolicyLoss(model, backend="naive").sample(*batch, k=2, max_new_tokens=2, progress=False)
    assert backends and set(backends) == {"naive"}
