"""Tiny random models of every causal-LM family in the installed transformers, and what
patch_causal_lm does with each: verified against the model's own logits, or refused by name.

``python tests/tiny_families.py docs/families.md`` writes the support table the README links.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from gem_fast.integrations import patch_causal_lm
from gem_fast.logprobs import output_head

FAMILIES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
VOCAB, LAYERS = 256, 2
_MAX_PARAMETERS = 15_000_000
# Size attributes as the configs name them; only those a config already has are set.
_SIZES = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64, "n_embd": 32, "n_head": 4,
    "n_positions": 64, "n_ctx": 64, "d_model": 32, "n_heads": 4, "ffn_dim": 64, "n_inner": 64, "d_ff": 64,
    "decoder_attention_heads": 4, "decoder_ffn_dim": 64, "encoder_attention_heads": 4, "encoder_ffn_dim": 64,
    "embed_dim": 32, "num_heads": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "time_step_rank": 4, "expand": 2,
    "mamba_n_heads": 8, "mamba_head_dim": 8, "mamba_d_ssm": 64, "n_groups": 1, "mamba_n_groups": 1,
    "projector_hidden_size": 32, "text_hidden_size": 32, "vision_hidden_size": 32,
    "output_embedding_size": 32, "input_embedding_size": 32, "embedding_size": 32, "sliding_window": 16,
    "attention_window": 16, "global_head_dim": 8, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "image_size": 32, "patch_size": 8, "rotary_dim": 8,
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8, "num_kv_shared_layers": 0,
    "emb_dim": 32, "ffn_hidden_size": 64, "expert_ffn_hidden_size": 32,
}
# Where the generic shrinking leaves a config its own validation rejects.
_FAMILY_SIZES = {
    "dots3_note": {"text_config": {"model_type": "dots3_note_text", "num_key_value_heads": 4}},
    "dots3_note_text": {"num_key_value_heads": 4}, "zaya": {"num_experts_per_tok": 1},
    "mamba2": {"num_heads": 8, "head_dim": 8}, "hunyuan_v1_dense": {"head_dim": 8}, "hunyuan_v1_moe": {"head_dim": 8},
    "ministral": {"head_dim": 8}, "deepseek_v2": {"num_experts_per_tok": 2}, "nemotron": {"num_key_value_heads": 2},
    "reformer": {"axial_pos_embds_dim": [16, 16], "axial_pos_shape": [8, 8]},
}
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers")
# Output transforms set away from their neutral value so that leaving one out changes the log-probs.
_TRANSFORMS = {"logits_scaling": 4.0, "lm_head_multiplier": 0.5, "logit_scale": 0.5,
               "final_logit_softcapping": 3.0, "logits_soft_cap": 3.0, "output_logit_soft_cap": 3.0}


def _overrides(config: PreTrainedConfig) -> dict:
    """Constructor keywords that shrink ``config`` (sub-configs as dicts), so that what the config
    derives from its sizes in ``__init__`` (head_dim, layer_types, ...) stays consistent."""
    values = vars(config)
    out = {key: _SIZES[key] for key, value in values.items()
           if key in _SIZES and isinstance(value, int) and not isinstance(value, bool)}
    out |= {key: {"model_type": value.model_type, **_overrides(value)} for key, value in values.items()
            if isinstance(value, PreTrainedConfig)}
    for key in _LAYER_COUNTS:
        layers = values.get(key)
        if not (isinstance(layers, int) and layers > LAYERS):
            continue
        out[key] = LAYERS
        out |= {name: value[:LAYERS] for name, value in values.items()  # per-layer lists keep their first entries
                if isinstance(value, list) and len(value) == layers}
    if "kv_lora_rank" in values:  # multi-head latent attention: as many kv heads as heads
        out["num_key_value_heads"] = _SIZES["num_attention_heads"]
    special = [key for key, value in values.items() if key.endswith("token_id") and isinstance(value, int) and value >= VOCAB]
    out |= {key: VOCAB - 1 - i for i, key in enumerate(special)}  # special ids inside the small vocabulary, distinct
    if "is_decoder" in values:  # BERT-style models are causal LMs only as decoders
        out["is_decoder"] = True
    return out


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A random fp32 model of ``model_type`` with a vocab of 256 and 2 layers, logits a few units wide."""
    config = AutoConfig.for_model(model_type)
    config = AutoConfig.for_model(model_type, **(_overrides(config) | _FAMILY_SIZES.get(model_type, {})))
    text = config.get_text_config(decoder=True)
    for key, value in _TRANSFORMS.items():
        if hasattr(text, key) and not isinstance(getattr(type(text), key, None), property):
            setattr(text, key, value)
    if hasattr(text, "unpadded_vocab_size"):
        text.unpadded_vocab_size = VOCAB - 6
    with torch.device("meta"):  # sizes the shrinking missed (sub-configs of other names) would cost seconds
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > _MAX_PARAMETERS:
        raise ValueError(f"the shrunk config still has {size / 1e6:.1f}M parameters")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        head = model.get_output_embeddings()
        if head is not None and isinstance(getattr(head, "weight", None), torch.Tensor):
            head.weight.mul_(4.0 / head.weight.float().std().clamp(min=1e-3))
    return model


@dataclass
class Outcome:
    """One row of the support table."""

    model_type: str
    tied: bool | None = None  # the head shares the input embeddings' weight
    transforms: str = ""  # what output_head reads beyond W h + b
    verified: bool = False  # patched, and equal to its own logits (log-probs and entropy)
    reason: str = ""  # why not: the refusal's message, or why no tiny model was built

    def row(self) -> str:
        tied = "" if self.tied is None else ("tied" if self.tied else "untied")
        status = "verified" if self.verified else ("refused: " if self.tied is not None else "not built: ") + self.reason
        return f"| {self.model_type} | {tied} | {self.transforms or '-'} | {status.replace('|', '/')} |"


def _transforms(model: torch.nn.Module) -> str:
    head, full = output_head(model), model.get_output_embeddings().weight
    read = [f"scale {head.logit_scale:g}" if head.logit_scale != 1.0 else "",
            f"soft-cap {head.logit_softcap:g}" if head.logit_softcap is not None else "",
            f"vocab cut to {head.weight.shape[0]}" if head.weight.shape[0] < full.shape[0] else ""]
    return ", ".join(r for r in read if r)


def _reference(model, ids, targets, temperature):
    logits = model(input_ids=ids, use_cache=False).logits.double() / temperature
    logp_all = logits.log_softmax(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[..., None]).squeeze(-1), entropy


def check_family(model_type: str) -> Outcome:
    """Build a tiny ``model_type``, patch it, and compare log-probs and entropy (T = 0.7) with the
    float64 log-softmax of its own logits; a refusal must name the type. (Gradients through the
    fused head are the kernels' and test_integrations.py's: here the question is the head's input.)
    Raises AssertionError where the patch is wrong; pytest.skip where no tiny model can be built."""
    try:
        model = tiny_model(model_type)
    except Exception as error:  # the table says which and why
        pytest.skip(f"{type(error).__name__}: {str(error).splitlines()[0][:120]}")
    embeddings = model.get_input_embeddings()
    outcome = Outcome(model_type, tied=embeddings is not None and model.get_output_embeddings().weight is embeddings.weight)
    ids = torch.randint(0, VOCAB - 8, (2, 6), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, 1)
    try:
        with torch.no_grad():
            want_logp, want_entropy = _reference(model, ids, targets, 0.7)
    except Exception as error:
        pytest.skip(f"its own forward fails: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
    try:
        patch_causal_lm(model, backend="torch")
    except ValueError as error:
        assert f"type {model_type!r}" in str(error), str(error)
        outcome.reason = str(error).split(": ", 2)[-1]
        return outcome
    outcome.transforms = _transforms(model)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, logprob_targets=targets, temperature=0.7)
    torch.testing.assert_close(out.logprobs.double(), want_logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.entropy.double(), want_entropy, rtol=1e-4, atol=1e-4)
    outcome.verified = True
    return outcome


def write_table(path: str) -> None:
    """The support table (markdown) for the installed transformers, from check_family on every family."""
    import transformers

    rows = []
    for model_type in FAMILIES:
        start = time.perf_counter()
        try:
            rows.append(check_family(model_type).row())
        except pytest.skip.Exception as skipped:
            rows.append(Outcome(model_type, reason=str(skipped.msg)).row())
        except AssertionError as error:
            rows.append(f"| {model_type} | | | WRONG: {str(error).splitlines()[0]} |")
        print(f"{model_type} {time.perf_counter() - start:.1f} s: {rows[-1]}"[:200], flush=True)
    with open(path, "w") as f:
        f.write(f"# patch_causal_lm on every causal-LM family of transformers {transformers.__version__}\n\n"
                "Generated by `python tests/tiny_families.py docs/families.md` from the test that CI runs\n"
                "(tests/test_families.py): a tiny random fp32 model of each type (vocab 256, 2 layers, the output\n"
                "transforms set away from neutral), patched with verification on, then compared with the float64\n"
                "log-softmax of its own logits at T = 0.7 (log-probs and entropy).\n"
                "*verified*: patched and equal; *refused*: `patch_causal_lm` raised `ValueError` naming the type\n"
                "(the model is left unpatched); *not built*: no tiny model of it could be made here.\n\n"
                "| family | head | transforms read from the config | patch |\n| --- | --- | --- | --- |\n")
        f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    write_table(sys.argv[1])
