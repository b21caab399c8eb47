"""The kernel benchmark's quick mode runs end to end and writes a complete, valid record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import kernels

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("bench")
    assert kernels.main(["--quick", "--device", "cpu", "--out", str(root)]) == 0
    out = root / "cpu"
    return json.loads((out / "results.json").read_text()), out


def test_quick_mode_writes_json_table_and_plots(quick_run):
    doc, out = quick_run
    kernels.validate(doc)
    for name in ("results.md", "time_vs_vocab.png", "memory_vs_vocab.png", "time_vs_tokens.png",
                 "memory_vs_tokens.png"):
        assert (out / name).stat().st_size > 0, name
    assert "## Headline" in (out / "results.md").read_text()
    assert doc["environment"]["loadavg"] and doc["environment"]["loadavg_end"]


def test_every_provider_has_a_row_at_every_point(quick_run):
    doc, _ = quick_run
    shapes = {(r["tokens"], r["vocab"]) for r in doc["rows"]}
    seen = {(r["provider"], r["op"], r["mode"], r["tokens"], r["vocab"]) for r in doc["rows"]}
    for p in doc["providers"]:
        for op in p["ops"]:
            for mode in kernels.MODES:
                for n, v in shapes:
                    assert (p["name"], op, mode, n, v) in seen


def test_rows_are_honest_about_status_backend_and_error(quick_run):
    doc, _ = quick_run
    installed = {p["name"]: p["installed"] for p in doc["providers"]}
    for row in doc["rows"]:
        if not installed[row["provider"]]:
            assert row["status"] == "not installed" and row["time_ms"] is None
        if row["provider"] == "gem_fast":
            assert row["status"] == "ok"
            assert row["backend"] == kernels.resolve_backend("auto", CPU)
        if row["provider"] == "torch_compile":
            assert row["status"] == "skipped" and "quick" in row["reason"]
        if row["status"] == "ok":
            # float32 against float64 on tiny shapes: any real error is orders above this.
            assert row["max_abs_err"] < 1e-3, row
            assert row["peak_extra_bytes"] is not None and row["fraction_of_peak"] > 0


def test_a_failing_provider_is_recorded_with_its_error():
    def build(op):
        def fail(*args):
            raise AssertionError("vocab must be a multiple of 128")
        return fail

    boom = kernels.Provider("boom", kernels.OPS, build, "test")
    config = kernels.make_config("quick", CPU)
    args = kernels.make_inputs("weighted_loss", 8, 256, config.hidden, config.dtype, CPU)
    row = kernels.run_point(boom, "weighted_loss", "fwd+bwd", 8, 256, config, CPU, args,
                            ref=lambda: {}, probes={"matmul_tflops_used": 1.0, "copy_gbps_used": 1.0})
    assert row["status"] == "error"
    assert row["error"] == "AssertionError: vocab must be a multiple of 128"
    kernels.validate({"schema": 1, "config": {}, "environment": {}, "probes": {}, "providers": [],
                      "rows": [row]})


def test_validate_rejects_incomplete_rows():
    with pytest.raises(ValueError, match="missing fields"):
        kernels.validate({"schema": 1, "config": {}, "environment": {}, "probes": {}, "providers": [],
                          "rows": [{"op": "entropy", "status": "ok"}]})
