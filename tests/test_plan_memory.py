"""The memory planner: its model of the loss and the engine's phases, its CLI, and its predictions
against peaks measured on the CPU (one real training step per case, bench/memory_plan.py).

The measured cases run in one probe interpreter, one forked process per rank (about 30 s in all).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import memory_plan as bench_plan
from gem_fast.config import TrainConfig, read_yaml
from gem_fast.kernels import chunked
from gem_fast.plan.kernel import PER_TOKEN_BYTES, naive_loss_bytes
from gem_fast.plan.memory import GIB, fused_loss_bytes, host_load_bytes, plan_memory, precision
from gem_fast.plan.shapes import PRESETS, model_shape
from gem_fast.plan.workload import Sampling, Setup, setup_from_train_config

LLAMA3_8B = PRESETS["llama3-8b"]
ROOT = Path(__file__).resolve().parents[1]
SEGA_8B_YAML = ROOT / "configs" / "llama3_8b_sega_8gpu.yaml"
STEP_TOL = 0.15  # |measured / predicted - 1| for the allocations of the measured step
STATIC_TOL = 0.10  # the same for parameters + AdamW states


def _cpu(**kw) -> Setup:
    return Setup(device="cpu", response_len=bench_plan._response_len(kw["seq_len"]), **kw)


# Small enough for seconds per step, large enough (hundreds of MB) to stand above RSS noise.
MEASURED = [
    ("naive", bench_plan.WIDE_VOCAB, _cpu(micro_batch=2, seq_len=512, loss="naive")),
    ("fused", bench_plan.WIDE_VOCAB, _cpu(micro_batch=2, seq_len=512, loss="fused")),
    ("fsdp2", bench_plan.WIDE, _cpu(world_size=2, micro_batch=2, seq_len=256, loss="fused")),
]


@pytest.fixture(scope="module")
def measured() -> dict[str, dict]:
    ranks = bench_plan.measure(MEASURED)
    return {case[0]: bench_plan.compare(case, r) for case, r in zip(MEASURED, ranks)}


# ---------------------------------------------------------------------------------------------
# Predicted vs measured (CPU, fp32).


@pytest.mark.slow
@pytest.mark.parametrize("name", ["naive", "fused", "fsdp2"])
def test_predicted_step_and_static_memory_match_measured(measured, name):
    row = measured[name]
    predicted, got = row["predicted"], row["measured"]
    assert abs(got["step_bytes"] / predicted["step_bytes"] - 1) <= STEP_TOL, (name, predicted, got)
    assert abs(got["static_bytes"] / predicted["static_bytes"] - 1) <= STATIC_TOL, (name, predicted, got)


@pytest.mark.slow
def test_fused_saves_what_the_plan_says_over_naive(measured):
    naive, fused = measured["naive"], measured["fused"]
    saved = naive["measured"]["step_bytes"] - fused["measured"]["step_bytes"]
    predicted = naive["predicted"]["step_bytes"] - fused["predicted"]["step_bytes"]
    assert naive["measured"]["step_bytes"] > 3 * fused["measured"]["step_bytes"]
    assert abs(saved / predicted - 1) <= STEP_TOL, (saved, predicted)


@pytest.mark.slow
def test_fsdp2_shards_the_static_terms_over_ranks(measured):
    row = measured["fsdp2"]
    unsharded = plan_memory(bench_plan.WIDE, replace(MEASURED[2][2], world_size=1))
    assert len(row["measured"]["ranks"]) == 2
    # Each rank holds half the parameters and AdamW states (+ a few MiB of process state).
    for rank in row["measured"]["ranks"]:
        assert rank["static_bytes"] < 0.6 * unsharded.static_bytes, (rank, unsharded.static_bytes)
        assert abs(rank["step_bytes"] / row["predicted"]["step_bytes"] - 1) <= STEP_TOL, rank


# ---------------------------------------------------------------------------------------------
# The model itself.


def test_presets_have_the_published_parameter_counts():
    assert LLAMA3_8B.params() == 8_030_261_248
    assert PRESETS["llama-1b"].params() == 1_235_814_400
    assert PRESETS["smollm2-135m"].params() == 134_515_008


def test_shape_from_config_json_file_folder_and_object(tmp_path):
    fields = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
              "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True, "head_dim": 64}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    expected = replace(PRESETS["llama-1b"], name=tmp_path.name)
    assert model_shape(tmp_path) == expected
    assert model_shape(tmp_path / "config.json") == expected
    assert model_shape(SimpleNamespace(**fields, name_or_path=tmp_path.name)) == expected
    # Missing GQA/head_dim/tie fields take the Llama defaults.
    del fields["num_key_value_heads"], fields["head_dim"], fields["tie_word_embeddings"]
    shape = model_shape(fields)
    assert (shape.kv_heads, shape.head_dim, shape.tied) == (32, 64, False)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(world_size=0), "world_size"),
    (dict(micro_batch=True), "micro_batch"),
    (dict(seq_len=1), "seq_len"),
    (dict(seq_len=128, response_len=128), "response_len"),
    (dict(loss="cross_entropy"), "loss"),
    (dict(device="tpu"), "device"),
    (dict(device="cpu", attention="flash"), "attention"),
    (dict(device="cpu", liger_layers=True), "liger_layers"),
    (dict(sampling=Sampling(prompts=1, k=0, prompt_len=8, new_tokens=8)), "sampling.k"),
])
def test_bad_setups_raise_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument}"):
        Setup(**kwargs)


def test_unknown_model_raises_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="^model"):
        model_shape("llama-9000")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="^model"):
        model_shape(tmp_path)


def test_naive_loss_is_six_fp32_logit_copies_and_a_mask():
    n, v = 1000, 32000
    assert naive_loss_bytes(n, v, logits_element=4) == 25 * n * v
    assert naive_loss_bytes(n, v, logits_element=2) == 25 * n * v  # backward, not bf16 logits, sets the peak


def test_fused_loss_follows_the_kernel_chunk_budget(monkeypatch):
    prec = precision(Setup(device="cpu"))
    n, h, v = 4096, 256, 32768
    before = fused_loss_bytes(n, h, v, prec, "cpu")
    # Several chunks: the fp32 dW accumulator, dh, and three chunk blocks (the current one, two temporaries).
    assert before == 4 * v * h + 4 * n * h + 3 * chunked.BLOCK_BYTES["cpu"] + PER_TOKEN_BYTES * n
    budget = chunked.BLOCK_BYTES["cpu"]
    monkeypatch.setitem(chunked.BLOCK_BYTES, "cpu", budget // 4)
    assert fused_loss_bytes(n, h, v, prec, "cpu") == before - 3 * (budget - budget // 4)


def test_sharding_divides_the_static_terms_not_the_activations():
    one = plan_memory(LLAMA3_8B, Setup(world_size=1, micro_batch=1, seq_len=2048))
    eight = plan_memory(LLAMA3_8B, Setup(world_size=8, micro_batch=1, seq_len=2048))
    assert eight.static_bytes * 8 == pytest.approx(one.static_bytes, rel=1e-6)
    assert one.static_bytes == 12 * LLAMA3_8B.params()  # fp32 master weights + two fp32 AdamW states

    def saved(plan):
        return next(t.bytes for t in plan.phase("end of forward (loss)").terms if t.name.startswith("saved"))

    # The bf16 activations under FSDP2 are smaller than one GPU's autocast ones (fp32 residual stream), never ÷8.
    assert saved(one) > saved(eight) > saved(one) / 2


def test_activation_checkpointing_and_fused_loss_lower_the_peak():
    base = Setup(world_size=8, micro_batch=2, seq_len=4096, loss="naive")
    peaks = {(loss, ac): plan_memory(LLAMA3_8B, replace(base, loss=loss, activation_checkpointing=ac)).total_bytes
             for loss in ("naive", "fused") for ac in (False, True)}
    assert peaks["fused", True] < peaks["fused", False] < peaks["naive", False]
    assert peaks["fused", True] < peaks["naive", True] < peaks["naive", False]
    logits_fp32 = 2 * 4095 * LLAMA3_8B.vocab * 4
    assert peaks["naive", True] - peaks["fused", True] > 4 * logits_fp32


def test_sega_yaml_setup_and_its_8b_prediction():
    config = TrainConfig.from_flat(read_yaml(SEGA_8B_YAML))
    shared = setup_from_train_config(config, world_size=8, loss="fused", device="cuda")
    assert (shared.micro_batch, shared.seq_len, shared.response_len) == (2, 1024 + 5 * 256, 5 * 256)
    setup = setup_from_train_config(config.replace(prefix_sharing="off"), world_size=8, loss="fused", device="cuda")
    assert (setup.micro_batch, setup.seq_len, setup.response_len) == (10, 1280, 256)
    # One packed row per prompt: 2,304 tokens through the decoder instead of 6,400, and less saved.
    assert plan_memory(LLAMA3_8B, shared).phase("end of forward (loss)").bytes < plan_memory(
        LLAMA3_8B, setup).phase("end of forward (loss)").bytes
    assert setup.sampling == Sampling(prompts=2, k=5, prompt_len=1024, new_tokens=256)
    assert setup.activation_checkpointing
    fused = plan_memory(LLAMA3_8B, setup)
    naive = plan_memory(LLAMA3_8B, replace(setup, loss="naive"))
    # The fused loss leaves sampling (the whole model gathered in bf16) as the peak.
    assert fused.peak_phase.name.startswith("SEGA")
    assert fused.total_bytes < 80 * GIB < naive.total_bytes + 40 * GIB
    assert naive.peak_phase.name == "end of forward (loss)"


# ---------------------------------------------------------------------------------------------
# The CLI.


def _cli():
    spec = importlib.util.spec_from_file_location("plan_memory", ROOT / "scripts" / "plan_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_prints_the_table_and_the_verdict(capsys):
    assert _cli().main(["--model", "llama3-8b", "--world_size", "8", "--micro_batch", "4", "--seq_len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "| GiB per rank | naive | fused |" in out and "| **peak** |" in out
    assert "naive: peak" in out and "does NOT fit in 80 GiB" in out
    assert "fused: peak" in out
    assert "host memory per rank while loading (bf16 safetensors): --init meta 0.1 GiB, --init full 44.9 GiB" in out


def test_host_memory_while_loading_meta_shards_full_does_not():
    # Llama-3-8B from bf16 safetensors: full init holds 8.0 B fp32 params (32 GB) + the file's pages (16 GB)
    # on every rank; meta init on 8 GPUs one bf16 slice of the [128256, 4096] embedding at a time.
    full = host_load_bytes(LLAMA3_8B, world_size=8, init="full", device="cuda")
    meta = host_load_bytes(LLAMA3_8B, world_size=8, init="meta", device="cuda")
    assert full == LLAMA3_8B.params() * 6
    assert meta == 128256 * 4096 // 8 * 2
    # On the CPU a meta rank also holds its fp32 shards.
    cpu_meta = host_load_bytes(LLAMA3_8B, world_size=2, init="meta", device="cpu")
    assert cpu_meta == -(-LLAMA3_8B.params() // 2) * 4 + 128256 * 4096 // 2 * 2


def test_cli_reads_the_training_yaml_and_flags_win(capsys):
    cli = _cli()
    assert cli.main(["--config", str(SEGA_8B_YAML), "--world_size", "8", "--loss", "fused"]) == 0
    out = capsys.readouterr().out
    assert "2 rows × 2304 tokens" in out and "2 prompts × k=5" in out  # prefix sharing: P + k·R per prompt
    repeated = ["--config", str(SEGA_8B_YAML), "--world_size", "8", "--loss", "fused", "--prefix_sharing", "off"]
    assert cli.main(repeated) == 0
    assert "10 rows × 1280 tokens" in capsys.readouterr().out
    assert cli.main([*repeated, "--k", "8"]) == 0
    assert "16 rows × 1280 tokens" in capsys.readouterr().out
    # The training config's names work as well as the planner's older ones (batch_size = micro_batch).
    assert cli.main([*repeated, "--batch_size", "1"]) == 0
    assert "5 rows × 1280 tokens" in capsys.readouterr().out


def test_cli_rejects_a_bad_model_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli().main(["--model", "gpt-17"])
    assert exit_info.value.code == 2
    assert "model: " in capsys.readouterr().err
