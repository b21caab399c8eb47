"""bench/train_step.py --quick: the record's numbers agree with each other and with the model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import train_step
from gem_fast.kernels import resolve_backend
from gem_fast.models import tiny_llama

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def train_step_quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("bench")
    assert train_step.main(["--quick", "--device", "cpu", "--out", str(root)]) == 0
    return json.loads((root / "cpu" / "train_step.json").read_text()), root / "cpu"


def _hand_counted_flops(shape: train_step.ModelShape, rows: int, seq_len: int) -> int:
    """The documented formula, written out from the shape (not from the model object)."""
    head_dim = shape.hidden // shape.heads
    attn = 2 * shape.hidden * shape.heads * head_dim + 2 * shape.hidden * shape.kv_heads * head_dim
    per_layer = attn + 3 * shape.hidden * shape.intermediate
    tokens = rows * seq_len
    return (6 * shape.layers * per_layer * tokens + 12 * shape.layers * shape.heads * head_dim * seq_len * tokens
            + 6 * shape.hidden * shape.vocab * rows * (seq_len - 1))


@pytest.mark.slow
def test_train_step_quick_record_is_consistent(train_step_quick):
    doc, out = train_step_quick
    train_step.validate(doc)
    assert "| variant | loss backend |" in (out / "train_step.md").read_text()
    cfg, rate = doc["config"], doc["probes"]["matmul_tflops_used"]
    ok = {r["variant"]: r for r in doc["rows"] if r["status"] == "ok"}
    assert set(ok) == {"naive", "fused"}
    flops = _hand_counted_flops(train_step.QUICK, cfg["rows"], cfg["seq_len"])
    assert cfg["model_flops_per_step"]["total"] == flops
    model = tiny_llama(shape=train_step.QUICK)
    n_params = sum(p.numel() for p in model.parameters())
    for row in ok.values():
        assert row["tokens"] == cfg["rows"] * cfg["seq_len"] == cfg["tokens_per_step"]
        assert row["tokens_per_s"] * row["time_s"] == pytest.approx(row["tokens"], rel=1e-9)
        assert row["model_flops"] == flops
        assert row["tflops"] == pytest.approx(flops / row["time_s"] / 1e12, rel=1e-9)
        assert row["mfu"] == pytest.approx(row["tflops"] / rate, rel=1e-9)
        assert (row["liger_path"], row["attention"]) == ("off", "sdpa")
        # fp32 weights and AdamW's two moments, plus its per-tensor step counters
        assert row["resident_bytes"] == 12 * n_params + 4 * len(list(model.parameters()))
    assert (ok["naive"]["loss_backend"], ok["fused"]["loss_backend"]) == ("naive", resolve_backend("auto", CPU))
    # Same weights and rows: the same first loss, the token mean of -log p, about log V at init std 0.02.
    assert ok["fused"]["first_loss"] == pytest.approx(ok["naive"]["first_loss"], rel=1e-5)
    assert ok["naive"]["first_loss"] == pytest.approx(math.log(train_step.QUICK.vocab), abs=0.05)
    # The LM head dominates this model: the fused loss must save most of the step's memory.
    assert ok["fused"]["peak_extra_bytes"] < 0.75 * ok["naive"]["peak_extra_bytes"]


@pytest.mark.slow
def test_train_step_quick_says_why_variants_did_not_run(train_step_quick):
    doc, _ = train_step_quick
    assert len(doc["rows"]) == len(train_step.variants()) == 8
    for row in doc["rows"]:
        if row["compile"]:
            assert row["status"] == "not run" and row["reason"].startswith("quick mode")
        elif row["liger"]:
            assert row["status"] == "not run" and "need CUDA" in row["reason"] and row["tokens_per_s"] is None
