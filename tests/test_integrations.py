"""patch_causal_lm on tiny random models of every supported family, tied and untied, against the
float64 log-softmax of the model's own logits; one process and 2-rank gloo FSDP2."""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoConfig, AutoModelForCausalLM

from gem_fast.distributed import free_port
from gem_fast.integrations import FusedLogprobOutput, patch_causal_lm, unpatch_causal_lm

VOCAB, LENGTH = 300, 12
# Extra config per family: Gemma's soft-cap and Cohere's scale set so that they change the logits.
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 8},
    "gemma3_text": {"head_dim": 8, "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 8},
    "cohere": {"logit_scale": 0.5},
}


def tiny_model(model_type: str, tied: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
        **FAMILIES[model_type])
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # logits of a few units, so the soft-cap bends them
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    targets[1, :3] = -100
    return ids, mask, targets


def reference(model, ids, mask, targets, temperature):
    """(logp, entropy) from the model's own logits in float64."""
    logits = model(input_ids=ids, attention_mask=mask).logits.double() / temperature
    logp_all = logits.log_softmax(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    valid = targets != -100
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def weighted(out_logp, out_entropy):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(out_logp.shape, generator=g, dtype=torch.float64)
    return (w * out_logp.double()).sum() + (w.flip(-1) * out_entropy.double()).sum()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_patched_model_matches_its_own_logits(model_type, tied):
    model = tiny_model(model_type, tied)
    ids, mask, targets = batch()
    ref_logp, ref_entropy = reference(model, ids, mask, targets, 0.7)
    ref_grads = torch.autograd.grad(weighted(ref_logp, ref_entropy), list(model.parameters()), allow_unused=True)
    patch_causal_lm(model, backend="torch")
    out = model(input_ids=ids, attention_mask=mask, logprob_targets=targets, temperature=0.7)
    assert isinstance(out, FusedLogprobOutput) and "logits" not in out
    assert out.logprobs.shape == out.entropy.shape == targets.shape
    torch.testing.assert_close(out.logprobs.double(), ref_logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.entropy.double(), ref_entropy, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(weighted(out.logprobs, out.entropy), list(model.parameters()), allow_unused=True)
    for (name, _), got, want in zip(model.named_parameters(), grads, ref_grads):
        if want is None:
            assert got is None or not got.any(), name
            continue
        scale = want.abs().max().item() + 1e-6
        torch.testing.assert_close(got.double() / scale, want.double() / scale, rtol=0, atol=2e-4, msg=name)


def test_unpatched_calls_and_unpatch_restore_the_model():
    model = tiny_model("gemma2", tied=True)
    ids, mask, _ = batch()
    before = model(input_ids=ids, attention_mask=mask).logits
    patch_causal_lm(patch_causal_lm(model))  # twice: a no-op the second time
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=0)
    unpatch_causal_lm(model)
    assert "forward" not in vars(model) and model.forward.__func__ is type(model).forward
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=0)


def test_unsupported_model_gets_one_clear_error():
    with pytest.raises(ValueError, match="^model: type None .*output embeddings"):
        patch_causal_lm(torch.nn.Linear(2, 2))


def _full_grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters() if p.grad is not None}


def _fsdp_worker(rank: int, port: int, root: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = {}
        for model_type, tied, patch_first in (("gemma2", True, True), ("llama", False, False)):
            model = tiny_model(model_type, tied)
            if patch_first:
                patch_causal_lm(model, backend="torch")
            for layer in model.base_model.layers:
                fully_shard(layer)
            fully_shard(model)
            if not patch_first:
                patch_causal_lm(model, backend="torch")
            ids, mask, targets = batch()  # the same batch on both ranks: averaged grads = one process's
            out = model(input_ids=ids, attention_mask=mask, logprob_targets=targets, temperature=0.7)
            weighted(out.logprobs, out.entropy).backward()
            results[model_type] = (out.logprobs.detach(), out.entropy.detach(), _full_grads(model))
        if rank == 0:
            torch.save(results, root / "fsdp.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_patched_model_under_fsdp2_equals_one_process(tmp_path):
    mp.spawn(_fsdp_worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    results = torch.load(tmp_path / "fsdp.pt")
    for model_type, tied in (("gemma2", True), ("llama", False)):
        model = patch_causal_lm(tiny_model(model_type, tied), backend="torch")
        ids, mask, targets = batch()
        out = model(input_ids=ids, attention_mask=mask, logprob_targets=targets, temperature=0.7)
        weighted(out.logprobs, out.entropy).backward()
        logp, entropy, grads = results[model_type]
        torch.testing.assert_close(logp, out.logprobs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, out.entropy, rtol=1e-5, atol=1e-5)
        want = _full_grads(model)
        assert grads.keys() == want.keys()
        for name, got in grads.items():
            torch.testing.assert_close(got, want[name], rtol=1e-4, atol=1e-5, msg=name)


def _generate(model, ids, mask, autocast: bool):
    """Sampled tokens and the shape of the logits the first (prefill) forward returned."""
    shapes = []
    hook = model.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.logits.shape)))
    try:
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            tokens = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=4,
                                    pad_token_id=0)
    finally:
        hook.remove()
    return tokens, shapes[0]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3"])
def test_generate_samples_the_same_patched_and_unpatched(model_type, autocast):
    # gpt2: absolute positions, built from the attention mask only when forward's signature names
    # position_ids; gemma3: prepare_inputs_for_generation without attention_mask.
    from tiny_families import tiny_model as family_model

    model = family_model(model_type)
    ids, mask, _ = batch()
    ids = ids % 200  # ordinary tokens of the 256-token tiny vocabularies
    want_tokens, want_shape = _generate(model, ids, mask, autocast)
    patch_causal_lm(model, backend="torch")
    assert inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))
    tokens, shape = _generate(model, ids, mask, autocast)
    assert shape == want_shape and shape[1] == 1  # logits_to_keep reaches the model: prefill keeps one position
    assert torch.equal(tokens, want_tokens)


def test_fused_calls_go_through_the_wrapper_that_was_there_and_unpatch_restores_it(monkeypatch):
    import gem_fast.integrations as integrations

    model = tiny_model("llama", tied=False)
    ids, mask, targets = batch()
    class_forward = model.forward

    @functools.wraps(class_forward)
    def bf16_forward(*args, **kwargs):  # what Accelerator(mixed_precision="bf16") puts on the instance
        calls.append(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return class_forward(*args, **kwargs)

    calls, autocast_seen = [], []
    model.forward = bf16_forward
    kernel = integrations.fused_logprob_entropy
    monkeypatch.setattr(integrations, "fused_logprob_entropy",
                        lambda *a, **k: autocast_seen.append(torch.is_autocast_enabled("cpu")) or kernel(*a, **k))
    patch_causal_lm(model, backend="torch", verify=False)
    out = model(input_ids=ids, attention_mask=mask, logprob_targets=targets, temperature=0.7)
    assert calls == [1] and autocast_seen == [True]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logp, _ = reference(model, ids, mask, targets, 0.7)
    # within bf16 rounding of the autocast reference: the head ran in bf16 as the model's own does
    torch.testing.assert_close(out.logprobs.double(), ref_logp, rtol=0, atol=0.1)
    unpatch_causal_lm(model)
    assert model.forward is bf16_forward


def test_verification_refuses_a_forward_that_changes_its_logits_by_name():
    model = tiny_model("llama", tied=True)
    own = model.forward

    def wrapped(*args, **kwargs):  # an unlisted transform of the logits
        out = own(*args, **kwargs)
        out.logits = out.logits * 1.5
        return out

    model.forward = wrapped
    with pytest.raises(ValueError, match=r"^model: type 'llama' \(LlamaForCausalLM\): .*log-probs by up to [0-9.]+ "):
        patch_causal_lm(model, backend="torch")
    assert model.forward is wrapped and "_gem_fast_patch" not in vars(model)  # left unpatched


def test_verification_skips_a_meta_model_with_a_logged_reason(caplog):
    with torch.device("meta"):
        model = tiny_model("llama", tied=False)
    with caplog.at_level("WARNING", logger="gem_fast.integrations"):
        patch_causal_lm(model)
    assert "meta device" in caplog.text and "verify_patch(model)" in caplog.text
    assert "_gem_fast_patch" in vars(model)


def test_verify_passes_at_bf16_and_costs_one_forward_of_each_kind():
    model = tiny_model("gemma2", tied=True).to(torch.bfloat16)
    calls = []
    model.base_model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                               with_kwargs=True)
    patch_causal_lm(model, backend="torch")
    assert calls == [(2, 8), (2, 8)]


def test_fused_calls_go_through_accelerate_hooks_and_unpatch_keeps_them():
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class CountingHook(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountingHook.calls += 1
            return args, kwargs

    model = add_hook_to_module(tiny_model("llama", tied=True), CountingHook())
    hooked = model.forward
    ids, mask, targets = batch()
    patch_causal_lm(model, backend="torch")  # verification: two calls through the hook
    assert CountingHook.calls == 2
    model(input_ids=ids, attention_mask=mask, logprob_targets=targets)
    assert CountingHook.calls == 3
    unpatch_causal_lm(model)
    assert model.forward is hooked
    remove_hook_from_module(model)  # accelerate's own removal still finds what it put there
    assert model.forward.__func__ is type(model).forward
