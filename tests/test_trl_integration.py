"""TRL 1.16's trainers read per-token statistics through ``model(..., labels=, fused_lm_head=True)`` (their own
fused head, trl.trainer.utils.add_fused_lm_head). A model patched by gem_fast after TRL added that head answers
the same calls from gem_fast's kernels, with TRL's settings and numbers: checked call by call, and by running
each trainer for 2 steps patched and unpatched on a tiny fp32 Llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gem_fast.integrations import TrlFusedOutput, patch_causal_lm
from test_integrations import batch, tiny_model

trl = pytest.importorskip("trl")
trl_utils = pytest.importorskip("trl.trainer.utils")

TRL_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _grads(output, params, fields=("log_probs", "entropy")):
    g = torch.Generator().manual_seed(3)
    loss = sum((torch.randn(getattr(output, f).shape, generator=g) * getattr(output, f)).sum() for f in fields)
    return torch.autograd.grad(loss, params)


def _assert_grads_close(got, want, names, bound):
    scale = max(w.abs().max().item() for w in want)
    for name, g, w in zip(names, got, want):
        assert (g - w).abs().max().item() <= bound * scale, name


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_trl_fused_call_gets_gem_fast_numbers_equal_to_trls(model_type, monkeypatch):
    import gem_fast.integrations as integrations

    calls = []
    kernel = integrations.fused_logprob_entropy
    monkeypatch.setattr(integrations, "fused_logprob_entropy", lambda *a, **k: calls.append(k) or kernel(*a, **k))
    model = tiny_model(model_type, tied=model_type == "gemma2")
    ids, mask, _ = batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # the prompt: only completion tokens are scored, as GRPO does
    with torch.no_grad():  # every other label the model's first choice, so that is_top1 has both values
        top1 = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    labels[:, 6::2] = top1[:, 5:-1:2]
    trl_model = copy.deepcopy(model)
    trl_utils.add_fused_lm_head(trl_model, temperature=0.7, outputs=TRL_FIELDS)
    want = trl_model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    params = list(trl_model.parameters())
    want_grads = _grads(want, params)

    patch_causal_lm(trl_model, temperature=0.7, backend="torch")  # after TRL's head, as on a trainer's model
    calls.clear()  # the patch's own verification
    got = trl_model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert len(calls) == 1 and calls[0]["return_row_stats"] and calls[0]["temperature"] == 0.7
    assert isinstance(got, TrlFusedOutput) and got.log_probs.shape == want.log_probs.shape == (2, ids.shape[1] - 1)
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.mean_logits, want.mean_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.log_sum_sq_probs, want.log_sum_sq_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.label_mask, want.label_mask) and torch.equal(got.is_top1, want.is_top1)
    assert got.is_top1.any() and not got.is_top1[got.label_mask].all()
    # fp32 with H=32, V=300: the two heads sum the same terms in another order (~1e-7 relative).
    _assert_grads_close(_grads(got, params), want_grads, [n for n, _ in trl_model.named_parameters()], 1e-5)


def test_fields_trl_did_not_ask_for_are_none_and_shift_labels_are_scored_unshifted():
    model = tiny_model("llama", tied=False)
    ids, mask, targets = batch()
    trl_utils.add_fused_lm_head(model)  # the reference model's head: log-probs only, T = 1
    want = model(input_ids=ids, attention_mask=mask, shift_labels=targets, fused_lm_head=True)
    patch_causal_lm(model, backend="torch", temperature=0.5)  # TRL's head's T = 1 wins for its calls
    got = model(input_ids=ids, attention_mask=mask, shift_labels=targets, fused_lm_head=True)
    assert got.log_probs.shape == targets.shape
    assert all(getattr(got, f) is None for f in TRL_FIELDS[1:])
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-4, atol=1e-5)


def test_cast_lm_head_to_fp32_runs_the_head_in_fp32_under_bf16_autocast():
    model = tiny_model("llama", tied=False)
    ids, mask, _ = batch()
    labels = ids.masked_fill(mask == 0, -100)
    heads = {}
    for cast in (False, True):
        heads[cast] = copy.deepcopy(model)
        trl_utils.add_fused_lm_head(heads[cast], cast_lm_head_to_fp32=cast, outputs=("log_probs", "entropy"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = {cast: m(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
                for cast, m in heads.items()}
        for m in heads.values():
            patch_causal_lm(m, backend="torch")
        got = {cast: m(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
               for cast, m in heads.items()}
    # The backbone runs in bf16 either way; the head's bf16 rounding (2^-8 relative on logits of a
    # few units) shows in the log-probs at ~1e-2, fp32's at ~1e-6: each must match its own TRL head.
    bf16_gap = (want[True].log_probs - want[False].log_probs).abs().max().item()
    assert bf16_gap > 1e-3
    for cast in (False, True):
        torch.testing.assert_close(got[cast].log_probs, want[cast].log_probs, rtol=0, atol=bf16_gap / 20)
        torch.testing.assert_close(got[cast].entropy, want[cast].entropy, rtol=0, atol=bf16_gap / 20)


# ---- the trainers, end to end ------------------------------------------------------------------------

TIMING_KEYS = ("runtime", "per_second", "step_time")
PROMPTS = [f"{i}+{i}=" for i in range(8)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny char-level Llama saved as an HF folder (trainers load the reference model from its path),
    and its greedy 3-character continuation of each prompt (SFT/DPO/KTO targets the model ranks first,
    so that is_top1 / mean_token_accuracy are not all zero)."""
    from tiny_lm import char_tokenizer
    from tiny_lm import tiny_model as tiny_char_llama

    tokenizer = char_tokenizer()
    model = tiny_char_llama(tokenizer)
    folder = tmp_path_factory.mktemp("tiny_trl")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    greedy = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        greedy.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return folder, tokenizer, greedy


def _length_reward(completions, **_):
    return [float(len(c)) for c in completions]


def _trainer(name, folder, tokenizer, greedy, out_dir, callback, **extra):
    from datasets import Dataset

    # SGD (not Adam, whose first step is lr·sign(g)) so that step 2 sees parameters that differ as
    # little as the step-1 gradients do.
    common = dict(output_dir=str(out_dir), max_steps=2, logging_steps=1, report_to="none", save_strategy="no",
                  use_cpu=True, seed=0, optim="sgd", learning_rate=0.1, bf16=False, per_device_train_batch_size=4)
    common.update(extra)
    peft_config = None
    if name.endswith("_lora"):
        from peft import LoraConfig

        name, peft_config = name[:-5], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    kwargs = dict(model=str(folder), processing_class=tokenizer, callbacks=[callback], peft_config=peft_config)
    if name in ("grpo", "rloo"):
        config = (trl.GRPOConfig if name == "grpo" else trl.RLOOConfig)(
            **common, num_generations=2, max_completion_length=6, beta=0.04)  # beta > 0: a reference model
        trainer_cls = trl.GRPOTrainer if name == "grpo" else trl.RLOOTrainer
        return trainer_cls(args=config, reward_funcs=_length_reward, train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                           **kwargs)
    if name == "dpo":
        data = {"prompt": PROMPTS, "chosen": greedy, "rejected": [g[::-1] + "x" for g in greedy]}
        return trl.DPOTrainer(args=trl.DPOConfig(**common), train_dataset=Dataset.from_dict(data), **kwargs)
    if name == "kto":
        data = {"prompt": PROMPTS, "completion": [g if i % 2 else g + "x" for i, g in enumerate(greedy)],
                "label": [i % 2 == 1 for i in range(len(PROMPTS))]}
        return trl.KTOTrainer(args=trl.KTOConfig(**common), train_dataset=Dataset.from_dict(data), **kwargs)
    assert name == "sft"
    data = {"prompt": PROMPTS, "completion": greedy}
    return trl.SFTTrainer(args=trl.SFTConfig(**common), train_dataset=Dataset.from_dict(data), **kwargs)


def _run(name, tiny_dir, out_dir, patched, monkeypatch, **extra):
    """(log history without timings, trainable-parameter gradients of each step, gem_fast kernel calls,
    TRL kernel calls)."""
    from transformers import TrainerCallback

    import gem_fast.integrations as integrations
    from gem_fast.trl_support import patch_trainer

    class Grads(TrainerCallback):
        steps: list = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **_):
            self.steps.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    ours, theirs = [], []
    kernel, trl_kernel = integrations.fused_logprob_entropy, trl_utils._ChunkedLogProbFunction
    monkeypatch.setattr(integrations, "fused_logprob_entropy", lambda *a, **k: ours.append(1) or kernel(*a, **k))

    class CountingTrlKernel:  # TRL's head looks its kernel up in trl.trainer.utils on each call
        @staticmethod
        def apply(*args):
            theirs.append(1)
            return trl_kernel.apply(*args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", CountingTrlKernel)
    callback = Grads()
    callback.steps = []
    trainer = _trainer(name, *tiny_dir, out_dir, callback, **extra)
    if patched:
        patch_trainer(trainer, backend="torch")
        patch_trainer(trainer, backend="torch")  # a second call changes nothing
    trainer.train()
    logs = [{k: v for k, v in entry.items() if not any(t in k for t in TIMING_KEYS)}
            for entry in trainer.state.log_history]
    return logs, callback.steps, len(ours), len(theirs)


# Both heads sum the same fp32 terms in another order (~1e-7 relative each); step 2 starts from
# parameters one SGD step (lr 0.1) apart by those differences, and GRPO/RLOO divide advantages by
# the std of 2 samples. Measured at most 6.3e-6 of the step's largest gradient (grpo_lora, step 2).
GRAD_BOUND = 5e-5
# Logged metrics: the same sums, and differences of nearby log-probs (kl ~ 1e-6) that cancel.
METRIC_REL, METRIC_ABS = 1e-4, 1e-6
TRAINERS = {"grpo": {}, "rloo": {}, "dpo": {}, "dpo_weighting": {"use_weighting": True}, "kto": {}, "sft": {},
            "sft_lora": {}, "grpo_lora": {},
            # The backbone in bf16 autocast, the head in fp32 as TRL's cast_lm_head_to_fp32 asks.
            "grpo_bf16_fp32_head": {"bf16": True, "cast_lm_head_to_fp32": True}}


@pytest.mark.parametrize("case", list(TRAINERS))
def test_trainer_runs_patched_and_matches_trls_own_head(case, tiny_dir, tmp_path, monkeypatch):
    name = case.removesuffix("_bf16_fp32_head").removesuffix("_weighting")
    if name.endswith("_lora"):
        pytest.importorskip("peft")
    want_logs, want_grads, ours, theirs = _run(name, tiny_dir, tmp_path / "trl", False, monkeypatch, **TRAINERS[case])
    assert ours == 0 and theirs > 0
    got_logs, got_grads, ours, theirs = _run(name, tiny_dir, tmp_path / "patched", True, monkeypatch,
                                             **TRAINERS[case])
    assert ours > 0 and theirs == 0, "a fused_lm_head call went to TRL's head"
    assert [entry.keys() for entry in got_logs] == [entry.keys() for entry in want_logs]
    for got, want in zip(got_logs, want_logs):
        for key, value in want.items():
            if isinstance(value, float) and not math.isnan(value):
                assert got[key] == pytest.approx(value, rel=METRIC_REL, abs=METRIC_ABS), key
            else:
                assert got[key] == value, key
    assert len(got_grads) == len(want_grads) == 2 and got_grads[0].keys() == want_grads[0].keys()
    if name.endswith("_lora"):
        assert all("lora_" in key for key in want_grads[0]), "the base weights are trained, not the adapter"
    for got, want in zip(got_grads, want_grads):
        names = list(want)
        _assert_grads_close([got[n] for n in names], [want[n] for n in names], names, GRAD_BOUND)


def test_patch_trainer_refuses_what_gem_fast_cannot_answer(tiny_dir, tmp_path):
    from transformers import TrainerCallback

    from gem_fast.trl_support import patch_trainer

    plain = _trainer("sft", *tiny_dir, tmp_path, TrainerCallback())
    plain.model.forward = type(plain.model).forward.__get__(plain.model)  # as if TRL had added no head
    with pytest.raises(ValueError, match="trainer.model: LlamaForCausalLM has no TRL fused head"):
        patch_trainer(plain)
