"""bench/gpu_suite.sh: the dry run end to end (what CI runs), and the driver's isolation of stages that hang,
crash or fail, with results on disk after every stage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_suite
from bench.gpu_suite import FILES, REPO, STAGES, Stage, StageContext, StageSkipped

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    from gem_fast.models import embedded_model_dir

    embedded_model_dir()  # converted once per machine (~40 s the first time): set-up, not part of the dry run
    out = tmp_path_factory.mktemp("suite")
    # No time limit of the test's own: the suite boxes each stage; this only stops a driver that hangs past them all.
    boxes_s = sum(s.box_s for s in STAGES) * gpu_suite.DRY_RUN_BOX_FACTOR + 60
    done = subprocess.run(["bash", str(REPO / "bench/gpu_suite.sh"), "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=boxes_s)
    return out, done


def test_dry_run_passes_with_exactly_the_five_files(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert (out / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (out / "suite.log").read_text()
    for stage in STAGES:
        assert f"=== stage {stage.name} (time box {stage.box_s} s, x{gpu_suite.DRY_RUN_BOX_FACTOR} here)" in log


def test_dry_run_summary_names_device_versions_and_every_stage(dry_run):
    out, _ = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] and summary["torch"] and summary["triton"] and summary["dry_run"] is True
    assert [s["name"] for s in summary["stages"]] == [s.name for s in STAGES]
    for stage in summary["stages"]:
        assert stage["status"] == "ok" or (stage["status"] == "skipped" and stage["reason"]), stage
        assert stage["seconds"] > 0


def test_dry_run_results_hold_every_stage_rows_and_tables(dry_run):
    from bench import kernel_report, train_step

    out, _ = dry_run
    doc = json.loads((out / "results.json").read_text())
    assert doc["suite"]["device"] and doc["suite"]["torch"] and doc["suite"]["results_dir"] == "bench/results/cpu"
    stages = {r["name"]: r for r in doc["stages"]}
    markdown = (out / "results.md").read_text()
    for name, record in stages.items():
        assert f"## {name}\n" in markdown and record["markdown"] and record["markdown"] in markdown
    kernel_rows = stages["kernels"]["rows"] + stages["entropy"]["rows"]
    assert kernel_rows and all(kernel_report.row_problem(r) is None and "invalid" not in r for r in kernel_rows)
    headline = [r for r in stages["kernels"]["rows"] if (r["tokens"], r["vocab"]) == tuple(
        stages["kernels"]["meta"]["config"]["headline"])]
    assert {"gem_fast", "naive", "torch_compile"} <= {r["provider"] for r in headline}
    steps = {r["variant"]: r for r in stages["train_step"]["rows"]}
    assert all(train_step.row_problem(r) is None for r in steps.values())
    assert steps["fused"]["first_loss"] == pytest.approx(steps["naive"]["first_loss"], rel=1e-5)
    assert steps["fused"]["mfu"] > 0 and steps["fused+liger"]["status"] == "not run"
    sampling = stages["sampling"]["rows"]
    assert {r["method"] for r in sampling} == {"hf_generate", "expand", "shared_prefix", "static"}
    assert all(r["status"] == "ok" and "decode_ms_per_step" in r and r["limit_ms_per_step"] > 0 for r in sampling)
    assert {r["provider"] for r in stages["sample_rows"]["rows"]} == {"gem_fast:torch", "gem_fast:triton", "torch_ops"}
    assert all(r["status"] == "ok" for r in stages["sample_rows"]["rows"])
    assert [r["step"] for r in stages["sega"]["rows"]] == [1, 2]
    for r in stages["sega"]["rows"]:  # the parts are inside the step and each was timed
        parts = [r[p] for p in ("sampling_s", "scoring_s", "forward_backward_s", "optimizer_s")]
        assert all(p > 0 for p in parts) and sum(parts) <= r["step_time_s"]
    assert all(r["loss"] == r["loss"] for r in stages["sega"]["rows"])  # not NaN
    prefix = {r["layout"]: r for r in stages["sega_prefix"]["rows"]}
    assert prefix["shared"]["tokens"] < prefix["repeated"]["tokens"]
    assert stages["sega_prefix"]["meta"]["max_rel_grad_diff"] <= 1e-4  # fp32 in the dry run
    marked = {r["test"] for r in stages["cuda_tests"]["rows"] if r["run"] == "marked cuda"}
    assert "tests.test_cuda_steps::test_bf16_sft_steps_on_cuda_start_at_the_fp32_cpu_loss" in marked


# ---------------------------------------------------------------------------------------------
# The driver, with stand-in stages (run in their own processes like the real ones)


def _stage_ok(ctx: StageContext) -> None:
    ctx.emit({"status": "ok", "seen": json.loads(Path(os.environ["SUITE_OUT"], "summary.json").read_text())["stages"]
              if Path(os.environ["SUITE_OUT"], "summary.json").exists() else []})
    ctx.section(["a table"])


def _stage_hang(ctx: StageContext) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the child: only SIGKILL ends them
    child = subprocess.Popen(["sleep", "600"])
    Path(os.environ["SUITE_OUT"], "child.pid").write_text(str(child.pid))
    ctx.emit({"status": "ok", "before": "the hang"})
    time.sleep(600)


def _stage_crash(ctx: StageContext) -> None:
    ctx.emit({"status": "ok", "before": "the crash"})
    os.abort()


def _stage_raise(ctx: StageContext) -> None:
    raise RuntimeError("boom")


def _stage_skip(ctx: StageContext) -> None:
    raise StageSkipped("nothing to measure here")


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a killed orphan may linger as a zombie until init reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


FAKE = {name: Stage(name, box, f"test_gpu_suite:_stage_{kind}", f"stand-in: {kind}")
        for name, box, kind in (("first", 30, "ok"), ("hang", 3, "hang"), ("crash", 30, "crash"),
                                ("raise", 30, "raise"), ("skip", 30, "skip"), ("last", 30, "ok"))}


@pytest.fixture
def suite_env(tmp_path, monkeypatch) -> Path:
    out = tmp_path / "out"
    monkeypatch.setenv("SUITE_OUT", str(out))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "tests")]))
    monkeypatch.setattr(gpu_suite, "KILL_GRACE_S", 1)
    return out


def test_a_hang_a_crash_and_an_error_each_lose_only_their_stage(suite_env):
    out = suite_env
    code = gpu_suite.run_suite(list(FAKE), out, dry_run=True, assets=None, merge=None, argv=["--dry-run"], stages=FAKE,
                               box_factor=1)
    assert code == 1
    summary = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert [summary[n]["status"] for n in FAKE] == ["ok", "error", "error", "error", "skipped", "ok"]
    assert summary["hang"]["reason"] == "time box of 3 s exceeded; 1 rows kept"
    assert summary["hang"]["seconds"] >= 3
    assert summary["crash"]["reason"].startswith("killed by SIGABRT") and "1 rows kept" in summary["crash"]["reason"]
    assert summary["raise"]["reason"] == "RuntimeError: boom"
    assert summary["skip"]["reason"] == "nothing to measure here"
    # the hung stage's child ignored SIGTERM too: the process group got SIGKILL
    assert not _running(int((out / "child.pid").read_text()))
    doc = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r["rows"] for r in doc["stages"]}
    assert rows["hang"] == [{"status": "ok", "before": "the hang"}]
    assert rows["crash"] == [{"status": "ok", "before": "the crash"}]
    # written after every stage: the last stage saw the five before it on disk
    assert [s["name"] for s in rows["last"][0]["seen"]] == list(FAKE)[:-1]
    assert "a table" in (out / "results.md").read_text() and "Traceback" in (out / "suite.log").read_text()


def test_a_rerun_with_merge_replaces_its_stage_and_keeps_the_others(suite_env, tmp_path):
    first = suite_env
    assert gpu_suite.run_suite(["first", "raise"], first, dry_run=True, assets=None, merge=None, argv=[],
                               stages=FAKE) == 1
    again = tmp_path / "again"
    fixed = {**FAKE, "raise": Stage("raise", 30, "test_gpu_suite:_stage_ok", "fixed")}
    assert gpu_suite.run_suite(["raise"], again, dry_run=True, assets=None, merge=first, argv=[], stages=fixed) == 0
    summary = json.loads((again / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [("first", "ok"), ("raise", "ok")]


def test_bad_command_lines_get_one_line_and_no_traceback(tmp_path):
    python = [sys.executable, "-m", "bench.gpu_suite"]
    cases = [(["--stages", "kernels,nope", "--dry-run", "--out", str(tmp_path)], "--stages: unknown nope"),
             (["--dry-run"], "--out DIR is required"),
             (["--dry-run", "--out", str(tmp_path), "--merge", str(tmp_path / "none")], "no results.json there")]
    if shutil.which("nvidia-smi") is None:
        cases.append((["--out", str(tmp_path)], "no NVIDIA GPU found (nvidia-smi): on a CPU, use --dry-run"))
    for args, message in cases:
        done = subprocess.run(python + args, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())


def test_the_time_boxes_fit_the_budget_and_every_stage_resolves():
    import importlib

    assert sum(s.box_s for s in STAGES) <= gpu_suite.SUITE_BUDGET_S <= 300
    for stage in STAGES:
        module, function = stage.target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), stage


def test_gpu_assets_are_the_tokenizer_and_config_without_weights(tmp_path):
    from bench.gpu_assets import has_assets, load_assets, write_assets
    from gem_fast.models import tiny_llama
    from gem_fast.plan.shapes import PRESETS

    paths = write_assets(tmp_path / "assets")
    names = {p.name for p in paths}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= names and has_assets(tmp_path / "assets")
    assert not any(n.endswith((".safetensors", ".bin")) for n in names)
    assert sum(p.stat().st_size for p in paths) < 8 * 2**20
    tokenizer, config = load_assets(tmp_path / "assets")
    assert len(tokenizer) == config.vocab_size == 49152 and tokenizer.padding_side == "left"
    model = tiny_llama(tokenizer, config=config, init_std=0.02)  # the dry run's model: the real config, tiny sizes
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (64, 2, 49152)
    assert model.config.head_dim == 16 and model.config.rms_norm_eps == config.rms_norm_eps
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as SmolLM2
    preset = tiny_llama(shape=PRESETS["smollm2-135m"], config=config, init_std=0.02)  # the real sizes
    assert preset.num_parameters() == PRESETS["smollm2-135m"].params()
