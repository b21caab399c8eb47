"""User errors as one line (exit 2) before any model loads, no overwrite of a finished run, the out_dir lock,
safe resume, the divergence guard, SIGTERM and a dying launcher."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import huggingface_hub.constants
import pytest
import torch
from tiny_lm import run_config, write_run_inputs

import gem_fast.train as train_module
from gem_fast import cli
from gem_fast.cli import eval_pref_accuracy, plan_kernel, plan_memory, prepare_data
from gem_fast import models
from gem_fast.config import GuardConfig
from gem_fast.distributed import DistEnv
from gem_fast.errors import UsageError
from gem_fast.guard import DivergenceError, DivergenceGuard, NonFiniteLossError, adamw_update_ratio
from gem_fast.policy import PolicyLoss
from gem_fast.reporting import JsonlLog
from gem_fast.run_dir import LOCK_NAME, claim_out_dir, model_source, run_lock, trained_chat_template
from gem_fast.train import lr_factor, train

CPU_ONE = DistEnv.single("cpu")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_run_inputs(tmp_path_factory.mktemp("reliability"))


def _one_line_error(capsys, code: int, call) -> str:
    """Run ``call``, expect SystemExit(code), no traceback and the error as stderr's last line; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert ": error: " in last, err
    return last


def _train_sft(argv: list[str]) -> int:
    return cli.main(argv, objective="sft", description="t")


def _train_sega(argv: list[str]) -> int:
    return cli.main(argv, objective="sega", description="t")


@pytest.mark.parametrize("case, expected", [
    ("missing_data", "--train_jsonl {tmp}/none.jsonl: no such file"),
    ("data_is_folder", "--train_jsonl {tmp}: is a folder, expected a file"),
    ("bad_yaml", "{tmp}/bad.yaml:2: invalid YAML"),
    ("missing_model", "--model_name_or_path {tmp}/no_model: no such file or folder"),
    ("offline_hub_id", "--model_name_or_path someorg/somemodel: not a local folder, and HF_HUB_OFFLINE is set"),
    ("not_utf8", "{tmp}/latin1.jsonl:2: not UTF-8 (byte 0xe9 at column 16)"),
    ("batch_size_0", "--batch_size 0: must be >= 1"),
    ("negative_lr", "--lr -0.001: must be > 0"),
    ("zero_lr", "--lr 0.0: must be > 0"),
    ("epochs_0", "--epochs 0: must be >= 1"),
    ("max_steps_negative", "--max_steps -1: must be >= 0"),
    ("sega_k_1", "--k 1: must be >= 2"),
    ("out_dir_is_file", "--out_dir {tmp}/a_file: is a file, expected a folder"),
    ("model_is_a_folder_of_other_things", "--model_name_or_path {tmp}: neither a model folder (no config.json)"),
    ("no_data_given", "--train_jsonl: not given; a JSON Lines file of training rows is needed (the repository "
                      "ships data/arith/test.jsonl"),
    ("gem_readme_data", "--train_jsonl data/nothing/pairs.jsonl: no such file (the repository ships"),
    ("batch_larger_than_the_data", "16 pairs, fewer than one global batch of 32"),
    ("top_m_above_1", "--top_m 5.0: must be <= 1"),
    ("yaml_wrong_type", "{tmp}/typed.yaml:2: k must be an integer, got 'four'"),
])
def test_training_user_errors_are_one_line_with_status_2_before_the_model_loads(
        inputs, tmp_path, capsys, monkeypatch, case, expected):
    model_dir, data = inputs
    (tmp_path / "bad.yaml").write_text("lr: 1e-3\n  batch_size: [2\n")
    (tmp_path / "latin1.jsonl").write_bytes(data.read_bytes().splitlines(keepends=True)[0]
                                            + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    (tmp_path / "a_file").write_text("")
    (tmp_path / "typed.yaml").write_text("lr: 1e-5\nk: four\n")
    # Every case also fails to load a model, so an error raised after loading would show as a different message.
    monkeypatch.setattr(train_module, "load_for_training", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", case == "offline_hub_id")
    base = ["--model_name_or_path", str(model_dir), "--train_jsonl", str(data), "--out_dir", str(tmp_path / "out")]
    argv = {
        "missing_data": ["--train_jsonl", str(tmp_path / "none.jsonl")],
        "data_is_folder": ["--train_jsonl", str(tmp_path)],
        "bad_yaml": ["--config", str(tmp_path / "bad.yaml")],
        "missing_model": ["--model_name_or_path", str(tmp_path / "no_model")],
        "offline_hub_id": ["--model_name_or_path", "someorg/somemodel"],
        "not_utf8": ["--train_jsonl", str(tmp_path / "latin1.jsonl")],
        "batch_size_0": ["--batch_size", "0"],
        "negative_lr": ["--lr=-1e-3"],
        "zero_lr": ["--lr", "0"],
        "epochs_0": ["--epochs", "0"],
        "max_steps_negative": ["--max_steps", "-1"],
        "sega_k_1": ["--k", "1"],
        "out_dir_is_file": ["--out_dir", str(tmp_path / "a_file")],
        "model_is_a_folder_of_other_things": ["--model_name_or_path", str(tmp_path)],
        "no_data_given": ["--train_jsonl", ""],
        "gem_readme_data": ["--train_jsonl", "data/nothing/pairs.jsonl"],
        "batch_larger_than_the_data": ["--batch_size", "32"],
        "top_m_above_1": ["--top_m", "5"],
        "yaml_wrong_type": ["--config", str(tmp_path / "typed.yaml")],
    }[case]
    entry = _train_sega if case in ("sega_k_1", "top_m_above_1", "yaml_wrong_type") else _train_sft
    err = _one_line_error(capsys, 2, lambda: entry(base + argv))
    assert expected.format(tmp=tmp_path) in err
    assert not (tmp_path / "out").exists()


def test_debug_flag_and_env_show_the_traceback(inputs, monkeypatch):
    with pytest.raises(UsageError, match="--batch_size 0"):
        _train_sft(["--batch_size", "0", "--debug"])
    monkeypatch.setenv("GEM_FAST_DEBUG", "1")
    with pytest.raises(UsageError, match="--batch_size 0"):
        _train_sft(["--batch_size", "0"])


def test_a_finished_run_is_refused_then_resumed_or_overwritten(tmp_path):
    for output in ("metrics.jsonl", "model.safetensors", "final/model.safetensors", "checkpoints/step_00000002/x"):
        out = tmp_path / output.replace("/", "_")
        (out / output).parent.mkdir(parents=True)
        (out / output).write_text("{}")
        has_checkpoint = output.startswith("checkpoints/")
        with pytest.raises(UsageError, match="holds a run .*pass --resume to continue it, --overwrite to replace it"):
            claim_out_dir(out, resume=False, overwrite=False, has_checkpoint=has_checkpoint)
        if has_checkpoint:
            claim_out_dir(out, resume=True, overwrite=False, has_checkpoint=True)
        else:  # finished (final/), or nothing to resume from: never step 0 over the run's own outputs
            with pytest.raises(UsageError, match="is finished|no checkpoint to resume from"):
                claim_out_dir(out, resume=True, overwrite=False, has_checkpoint=False)
        claim_out_dir(out, resume=False, overwrite=True, has_checkpoint=has_checkpoint)
        assert not any((out / n).exists() for n in ("metrics.jsonl", "final", "checkpoints"))
    claim_out_dir(tmp_path / "fresh", resume=True, overwrite=False, has_checkpoint=False)  # nothing there yet
    with pytest.raises(UsageError, match="choose one"):
        claim_out_dir(tmp_path, resume=True, overwrite=True, has_checkpoint=False)


def test_resume_of_a_finished_run_is_refused_and_keeps_its_final_model(inputs, tmp_path):
    model_dir, data = inputs
    kw = dict(batch_size=2, max_steps=2)  # save_every 0: no checkpoint, final/ at the end
    train(run_config(model_dir, data, tmp_path, **kw))
    weights = tmp_path / "final" / "model.safetensors"
    before = weights.read_bytes(), (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(UsageError, match=f"--resume: the run in {tmp_path} is finished .*pass --overwrite"):
        train(run_config(model_dir, data, tmp_path, **kw, resume=True))
    shutil.rmtree(tmp_path / "final")  # as if it had crashed before the export: still nothing to resume from
    with pytest.raises(UsageError, match="no checkpoint to resume from .*--overwrite"):
        train(run_config(model_dir, data, tmp_path, **kw, resume=True))
    assert (tmp_path / "metrics.jsonl").read_text() == before[1]
    assert train(run_config(model_dir, data, tmp_path, **kw, overwrite=True)).steps_done == 2
    assert weights.is_file()


def test_a_run_folder_as_model_means_its_final_and_any_other_folder_is_named(tmp_path, caplog):
    run = tmp_path / "sft-demo"
    (run / "checkpoints").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    with pytest.raises(UsageError, match=f"--model_name_or_path {run}: a training run without final/ yet "
                                         r"\(it holds checkpoints/, train_config.json\); finish it"):
        model_source(str(run))
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    with caplog.at_level(logging.INFO, logger="gem_fast.run_dir"):
        assert model_source(str(run)) == str(run / "final")
    assert "a training run; using its trained model" in caplog.text
    assert model_source(str(run / "final")) == str(run / "final")
    assert model_source(None) is None
    assert trained_chat_template(str(run / "final")) is None  # no chat_template recorded: the default applies
    (run / "train_config.json").write_text('{"chat_template": true}')
    assert trained_chat_template(model_source(str(run))) is True  # eval follows how the run trained
    assert trained_chat_template(str(tmp_path)) is None
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("")
    with pytest.raises(UsageError, match=r"neither a model folder \(no config.json\) nor a training run \(no "
                                         r"final/\); it holds a.txt"):
        model_source(str(other), "--ref_model_name_or_path")


def test_out_dir_lock_stops_a_second_run_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    with run_lock(tmp_path) as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started"]
        with pytest.raises(UsageError, match=f"in use by pid {os.getpid()} on .* since"):
            with run_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK_NAME).exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(gone.stdout), "host": os.uname().nodename,
                                                  "started": "earlier"}))
    with caplog.at_level(logging.WARNING), run_lock(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in caplog.text


def test_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_stops(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        JsonlLog(path).resume(2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n' and "torn last line" in caplog.text
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(UsageError, match="metrics.jsonl:2: not a JSON record"):
        JsonlLog(path).resume(2)


def test_resume_refuses_changed_settings_unless_allowed_and_then_applies_the_new_lr(inputs, tmp_path):
    model_dir, data = inputs
    kw = dict(batch_size=2, max_steps=2, save_every=2, export_hf=False, lr_decay="linear", warmup_steps=0)
    assert train(run_config(model_dir, data, tmp_path, **kw)).steps_done == 2
    with pytest.raises(UsageError, match=r"other settings \(lr 0.003 -> 0.001, max_steps 2 -> 3\).*"
                                         "--allow_config_change"):
        train(run_config(model_dir, data, tmp_path, **{**kw, "max_steps": 3, "lr": 1e-3}, resume=True))
    changed = tmp_path / "changed.jsonl"
    changed.write_text(data.read_text().replace("Q0", "Z0"))
    with pytest.raises(UsageError, match="train_data_sha256"):
        train(run_config(model_dir, changed, tmp_path, **kw, resume=True))
    records = []
    resumed = train(run_config(model_dir, data, tmp_path, **{**kw, "max_steps": 3, "lr": 1e-3}, resume=True,
                               allow_config_change=True), on_step=lambda step, record, policy: records.append(record))
    assert resumed.steps_done == 3
    assert records[0]["lr"] == pytest.approx(1e-3 * lr_factor(2, warmup=0, total=3, decay="linear", min_ratio=0.1))
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["lr"] == 1e-3 and len(saved["train_data_sha256"]) == 64


def test_lr_1e6_stops_at_step_1_with_nothing_saved(inputs, tmp_path, capsys):
    model_dir, data = inputs
    before = (model_dir / "model.safetensors").read_bytes()
    argv = ["--model_name_or_path", str(model_dir), "--train_jsonl", str(data), "--out_dir", str(tmp_path),
            "--lr", "1e6", "--save_every", "1", "--max_steps", "3", "--batch_size", "2", "--progress", "false"]
    err = _one_line_error(capsys, 1, lambda: _train_sft(argv))
    assert "step 1: the update's norm is" in err and "limit --max_update_ratio 0.1; lr 1e+06" in err
    assert "the step was not applied; the last checkpoint is none" in err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "model.safetensors").exists()
    assert (model_dir / "model.safetensors").read_bytes() == before


def test_guard_refuses_non_finite_and_spiking_gradients():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    guard = DivergenceGuard(GuardConfig(max_grad_norm_spike=10.0))
    with pytest.raises(NonFiniteLossError, match="step 1: loss 1.0, grad norm nan"):
        guard.check(1, 1.0, float("nan"), optimizer, CPU_ONE, last_good="ckpt")
    for step in range(1, 11):
        assert guard.check(step, 1.0, 1.0 + step / 100, optimizer, CPU_ONE, last_good="ckpt")["update_ratio"] > 0
    with pytest.raises(DivergenceError, match=r"step 11: grad norm 20 is 19 × the median 1.055 of the last 10 "
                                              r"steps \(limit --max_grad_norm_spike 10\); .* last checkpoint is ckpt"):
        guard.check(11, 1.0, 20.0, optimizer, CPU_ONE, last_good="ckpt")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_update_ratio_equals_the_step_adamw_then_takes(weight_decay):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False))
    model[1].weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=weight_decay)
    for _ in range(3):  # the first step (no optimizer state yet) and later ones
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        predicted = adamw_update_ratio(optimizer, CPU_ONE)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
        weights = torch.cat([b.flatten() for b in before])
        assert predicted == pytest.approx((update.norm() / weights.norm()).item(), rel=1e-5)


def test_sigterm_checkpoints_and_exits_143_without_a_traceback(inputs, tmp_path, monkeypatch, capsys):
    model_dir, data = inputs

    def sigterm_at_step_1(done: int, record: dict, policy: torch.nn.Module) -> None:
        if done == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 2; the loop stops after it

    monkeypatch.setattr(train_module, "train", functools.partial(train, on_step=sigterm_at_step_1))
    argv = ["--model_name_or_path", str(model_dir), "--train_jsonl", str(data), "--out_dir", str(tmp_path),
            "--max_steps", "5", "--progress", "false", "--export_hf", "false"]
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert _train_sft(argv) == 128 + signal.SIGTERM
    finally:  # main leaves a no-op SIGTERM handler for the process's exit
        signal.signal(signal.SIGTERM, handler)
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    assert not (tmp_path / LOCK_NAME).exists()


def test_eval_and_prepare_refuse_to_overwrite_and_check_outputs_first(inputs, tmp_path, capsys, monkeypatch):
    model_dir, data = inputs
    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    assert eval_pref_accuracy.default_output(str(model_dir), data) == model_dir / "pref_accuracy-pairs.json"
    assert eval_pref_accuracy.default_output(None, data) == Path("outputs/pref_accuracy/embedded-smollm2-pairs.json")
    report = model_dir / "pref_accuracy-pairs.json"
    report.write_text("{}")
    try:
        err = _one_line_error(capsys, 2, lambda: eval_pref_accuracy.main(
            ["--model_name_or_path", str(model_dir), "--eval_jsonl", str(data)]))
        assert f"{report}: exists; pass --overwrite to replace it, or choose another --output_json" in err
    finally:
        report.unlink()
    (tmp_path / "a_file").write_text("")
    err = _one_line_error(capsys, 2, lambda: eval_pref_accuracy.main(
        ["--model_name_or_path", str(model_dir), "--eval_jsonl", str(data),
         "--output_json", str(tmp_path / "a_file" / "report.json")]))
    assert f"--output_json {tmp_path / 'a_file' / 'report.json'}: {tmp_path / 'a_file'} is a file, not a folder" in err
    err = _one_line_error(capsys, 2, lambda: eval_pref_accuracy.main(["--eval_jsonl", str(tmp_path / "none.jsonl")]))
    assert "--eval_jsonl" in err and "no such file" in err

    argv = ["--input", str(data), "--out_dir", str(tmp_path / "split"), "--test_fraction", "0.25"]
    assert prepare_data.main(argv) == 0
    train_file = tmp_path / "split" / "train.jsonl"
    kept = train_file.read_text()
    err = _one_line_error(capsys, 2, lambda: prepare_data.main(argv))
    assert f"{train_file}: exists; pass --overwrite to replace it, or choose another --out_dir" in err and train_file.read_text() == kept
    assert prepare_data.main([*argv, "--overwrite", "--seed", "1"]) == 0
    err = _one_line_error(capsys, 2, lambda: prepare_data.main(["--input", str(tmp_path / "x.jsonl"),
                                                                 "--out_dir", str(tmp_path)]))
    assert "--input" in err and "no such file" in err


def test_planners_report_bad_input_as_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 2\nk: [3\n")
    err = _one_line_error(capsys, 2, lambda: plan_memory.main(["--config", str(bad)]))
    assert f"{bad}:3: invalid YAML" in err
    err = _one_line_error(capsys, 2, lambda: plan_memory.main(["--model", str(tmp_path / "none.json")]))
    assert "none.json" in err
    with pytest.raises(SystemExit) as exit_info:
        plan_kernel.main(["--tokens", "0"])
    assert exit_info.value.code == 2 and "--tokens: must be > 0, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_a_worker_exits_when_its_launcher_is_killed(tmp_path):
    # launcher -> worker; SIGKILL the launcher: the worker gets SIGTERM (PR_SET_PDEATHSIG) and ends.
    worker = ("import time; from gem_fast.distributed import exit_with_launcher; "
              "print(exit_with_launcher(), flush=True); time.sleep(60)")
    launcher = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {worker!r}], stdout=subprocess.PIPE, text=True)
        print(child.pid, child.stdout.readline().strip(), flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    pid, armed = proc.stdout.readline().split()
    assert armed == "True"
    proc.kill()
    proc.wait()
    for _ in range(100):  # the orphan is reparented; poll its /proc entry until it is gone
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "State:\tZ" in status.read_text():
            break
        subprocess.run(["sleep", "0.1"])
    else:
        os.kill(int(pid), signal.SIGKILL)
        pytest.fail("the worker outlived its launcher")


def test_a_hub_id_the_hub_cannot_provide_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(UsageError, match=r"^model someorg/somemodel: not a local folder, and the Hugging Face Hub "
                                         r"did not provide it \(We couldn't connect .* to load the files.\);"):
        models.load_tokenizer("someorg/somemodel")


def test_a_signal_stops_sega_between_micro_steps_and_the_resumed_run_matches(inputs, tmp_path, monkeypatch):
    model_dir, data = inputs
    kw = dict(objective="sega", k=2, gen_max_new_tokens=4, batch_size=1, grad_accum=3, max_steps=3, export_hf=False)
    full = train(run_config(model_dir, data, tmp_path / "full", **kw))
    samples = []
    sample = PolicyLoss.sample
    monkeypatch.setattr(PolicyLoss, "sample", lambda self, *a, **k: samples.append(1) or sample(self, *a, **k))

    def sigint_after_step_1(done: int, record: dict, policy: torch.nn.Module) -> None:
        if done == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C; step 2 then samples its first micro-step only

    stopped = train(run_config(model_dir, data, tmp_path / "run", **kw), on_step=sigint_after_step_1)
    assert (stopped.stopped_by_signal, stopped.steps_done, len(samples)) == (signal.SIGINT, 1, 3 + 1)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000001"]
    resumed = train(run_config(model_dir, data, tmp_path / "run", **kw, resume=True))
    assert resumed.losses == pytest.approx(full.losses[1:], rel=1e-6)


def test_progress_false_prints_no_step_lines_and_true_one_per_step(inputs, tmp_path, capsys):
    model_dir, data = inputs
    train(run_config(model_dir, data, tmp_path / "quiet", export_hf=False, progress=False))
    quiet = capsys.readouterr()
    assert "grad_norm" not in quiet.out + quiet.err
    train(run_config(model_dir, data, tmp_path / "shown", export_hf=False, progress=True))
    assert capsys.readouterr().out.count("grad_norm") == 3


def _start_training(tmp_path: Path, inputs, script: str, out: Path, *flags: str) -> tuple[subprocess.Popen, Path]:
    """``scripts/<script>`` on the tiny model for far more steps than the test waits for; its stderr file."""
    model_dir, data = inputs
    root = Path(__file__).resolve().parents[1]
    err = tmp_path / f"{out.name}-stderr.txt"
    argv = [sys.executable, str(root / "scripts" / script), "--model_name_or_path", str(model_dir),
            "--train_jsonl", str(data), "--out_dir", str(out), "--epochs", "1000", "--progress", "false", *flags]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err.open("w"), env=env), err


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], what: str) -> None:
    for _ in range(1200):
        if ready():
            return
        assert proc.poll() is None, f"the run ended before {what}"
        subprocess.run(["sleep", "0.1"])
    proc.kill()
    pytest.fail(f"never saw {what}")


ANNOUNCED = "SIGINT: stopping after this step with a checkpoint; resume with --resume (Ctrl-C again stops at once)"


@pytest.mark.slow
def test_ctrl_c_is_acknowledged_checkpoints_the_step_and_a_second_one_stops_at_once(inputs, tmp_path):
    out = tmp_path / "sft"
    proc, err = _start_training(tmp_path, inputs, "train_sft.py", out, "--save_every", "4")
    metrics = out / "metrics.jsonl"
    _wait_for(proc, lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 1, "step 2")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    text = err.read_text()
    assert text.count(ANNOUNCED) == 1 and "Traceback" not in text, text
    steps = len(metrics.read_text().splitlines())
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == f"step_{steps:08d}"  # nothing lost
    assert not (out / LOCK_NAME).exists()

    # A SEGA step on the CPU samples for seconds: the second Ctrl-C lands inside it and does not wait for it.
    out = tmp_path / "sega"
    proc, err = _start_training(tmp_path, inputs, "train_sega.py", out, "--k", "2", "--gen_max_new_tokens", "256")
    _wait_for(proc, lambda: "global batch" in err.read_text(), "the first step")
    proc.send_signal(signal.SIGINT)
    _wait_for(proc, lambda: ANNOUNCED in err.read_text(), "the announcement")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    text = err.read_text()
    assert text.strip().splitlines()[-1] == ("train_sega.py: error: stopped at once by a second Ctrl-C; the last "
                                            "checkpoint is kept (--resume continues from it)"), text
    assert "Traceback" not in text and not (out / LOCK_NAME).exists()
    # It landed inside step 1, or (a loaded machine, candidates that hit EOS early) inside step 1's save:
    # either way no step is logged beyond 1 and a save it cut short left only its ``.tmp_`` folder.
    steps = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
    complete = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else []
    assert steps <= 1 and all(int(name.removeprefix("step_")) <= steps for name in complete), (steps, complete)
