"""The kernel benchmark: quick mode end to end, fair interleaved timing, and writers that keep bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import kernel_report, kernels
from bench.common import RepeatPolicy, measure_interleaved
from bench.kernel_ops import MODES, OPS, make_inputs
from bench.kernel_providers import Provider, build_providers
from gem_fast.kernels import resolve_backend

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
PROBES = {"matmul_tflops_used": 1.0, "copy_gbps_used": 1.0}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("bench")
    assert kernels.main(["--quick", "--device", "cpu", "--out", str(root)]) == 0
    out = root / "cpu"
    return json.loads((out / "results.json").read_text()), out


def test_quick_mode_writes_json_table_and_plots(quick_run):
    doc, out = quick_run
    kernel_report.validate(doc)
    for name in ("results.md", "time_vs_vocab.png", "memory_vs_vocab.png", "time_vs_tokens.png",
                 "memory_vs_tokens.png"):
        assert (out / name).stat().st_size > 0, name
    assert "## Headline (N=16, V=512)" in (out / "results.md").read_text()
    assert doc["environment"]["loadavg"] and doc["environment"]["loadavg_end"]


def test_every_provider_of_a_sweep_has_a_row_at_each_of_its_points(quick_run):
    doc, _ = quick_run
    seen = {(r["provider"], r["op"], r["mode"], r["tokens"], r["vocab"]) for r in doc["rows"]}
    assert len(seen) == len(doc["rows"])  # a point shared by two sweeps is measured once
    for sweep in doc["config"]["sweeps"]:
        for p in doc["providers"]:
            if sweep["providers"] is not None and p["name"] not in sweep["providers"]:
                continue
            for op in set(p["ops"]) & set(sweep["ops"]):
                for mode in sweep["modes"]:
                    if mode == "fwd" and p["name"] == "gem_fast:dw_fp32":
                        continue  # dW options only matter with a backward
                    for n, v in sweep["points"]:
                        assert (p["name"], op, mode, n, v) in seen, (p["name"], op, mode, n, v)


def test_timed_points_take_the_median_of_three_runs_after_a_warm_up(quick_run):
    doc, _ = quick_run
    memory_only = {s["name"] for s in doc["config"]["sweeps"] if s["memory_only"]}
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    assert ok
    for row in ok:
        if row["sweep"] in memory_only:
            assert row["repeats"] == 1 and row["provider"] in ("gem_fast", "naive")
        else:
            assert row["repeats"] >= 3 and row["time_ms"] == pytest.approx(sorted(row["times_ms"])[1]), row


def test_rows_are_honest_about_status_backend_and_error(quick_run):
    doc, _ = quick_run
    installed = {p["name"]: p["installed"] for p in doc["providers"]}
    for row in doc["rows"]:
        if not installed[row["provider"]]:
            assert row["status"] == "not installed" and row["time_ms"] is None
        if row["provider"] == "gem_fast":
            assert row["status"] == "ok"
            assert row["backend"] == resolve_backend("auto", CPU)
        if row["provider"] == "torch_compile":
            assert row["status"] == "skipped" and "quick" in row["reason"]
        if row["status"] == "ok":
            # float32 against float64 on tiny shapes: any real error is orders above this.
            assert row["max_abs_err"] < 1e-3, row
            assert row["peak_extra_bytes"] is not None and row["fraction_of_peak"] > 0


def test_interleaved_timing_runs_round_robin_after_one_warm_up_each():
    calls: list[str] = []

    def call(name: str):
        return lambda: calls.append(name)

    def boom():
        calls.append("boom")
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    got = measure_interleaved({"a": call("a"), "boom": boom, "b": call("b")}, CPU,
                              RepeatPolicy(warmup=1, min_reps=3, max_reps=3, budget_s=0.0))
    # warm-up a, boom (fails, dropped), b; then three rounds of a, b
    assert calls == ["a", "boom", "b"] + ["a", "b"] * 3
    assert [len(got["a"]), len(got["b"])] == [3, 3]
    assert got["boom"].endswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 16.00 GiB")


def test_a_failing_provider_is_a_row_with_its_error_beside_the_others():
    def build(op):
        def fail(*args):
            raise AssertionError("vocab must be a multiple of 128")
        return fail

    boom = Provider("boom", OPS, build, "test")
    naive = next(p for p in build_providers(CPU) if p.name == "naive")
    config = kernels.make_config("quick", CPU)
    sweep = config.sweeps[0]
    args = make_inputs("weighted_loss", 8, 256, config.hidden, config.dtype, CPU)
    rows = kernels.run_point([boom, naive], sweep, "weighted_loss", "fwd+bwd", 8, 256, config, CPU, args,
                             ref=lambda: kernels.reference("weighted_loss", kernels.error_slice("weighted_loss", args)),
                             probes=PROBES)
    by_name = {r["provider"]: r for r in rows}
    assert by_name["boom"]["status"] == "error"
    assert by_name["boom"]["error"] == "AssertionError: vocab must be a multiple of 128"
    assert by_name["naive"]["status"] == "ok" and by_name["naive"]["repeats"] == 3
    for row in rows:
        assert kernel_report.row_problem(row) is None


def test_writers_keep_a_run_with_a_bad_row_and_mark_it(quick_run, tmp_path):
    doc, _ = quick_run
    doc = json.loads(json.dumps(doc))
    doc["rows"][0] = {**doc["rows"][0], "status": "ok", "time_ms": None}
    del doc["rows"][1]["backend"]
    paths, bad = kernel_report.write_outputs(doc, tmp_path)
    assert bad == 2 and {p.name for p in paths} >= {"results.json", "results.md"}
    written = json.loads((tmp_path / "results.json").read_text())
    assert len(written["rows"]) == len(doc["rows"])
    assert written["rows"][0]["invalid"] == "ok without a positive time"
    assert written["rows"][1]["invalid"].startswith("missing fields ['backend']")
    assert "invalid: ok without a positive time" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="row 0: ok without a positive time"):
        kernel_report.validate(doc)


def test_torch_compile_runs_only_where_the_config_compiles():
    compiled = next(p for p in build_providers(CPU) if p.jit)
    for device in (CPU, torch.device("cuda")):
        config = kernels.make_config("full", device)
        assert len(config.compile_at) == 1 and config.compile_at[0] == config.headline
        assert kernels.skip_reason(compiled, "weighted_loss", *config.headline, config, device) is None
        other = next(p for s in config.sweeps for p in s.points if p != config.headline)
        assert kernels.skip_reason(compiled, "weighted_loss", *other, config, device).startswith("compiled only at")


def test_the_cpu_memory_sweep_reaches_8192_tokens_with_naive_beside_gem_fast():
    config = kernels.make_config("full", CPU)
    memory = [s for s in config.sweeps if s.memory_only]
    assert [max(n for n, _ in s.points) for s in memory] == [8192]
    assert set(memory[0].providers) == {"gem_fast", "naive"} and memory[0].axis == "tokens"
    assert all(kernels.skip_reason(p, "weighted_loss", 8192, 49152, config, CPU) is None
               for p in build_providers(CPU) if p.name in memory[0].providers)


def test_every_timed_sweep_warms_up_and_takes_three_samples():
    for device in (CPU, torch.device("cuda")):
        for mode in ("quick", "full"):
            for sweep in kernels.make_config(mode, device).sweeps:
                if not sweep.memory_only:
                    assert sweep.policy.warmup >= 1 and sweep.policy.min_reps >= 3, (mode, sweep.name)
                assert set(sweep.modes) <= set(MODES)
