"""A run's out_dir (gem_fast/run_dir.py): no overwrite of a finished run, a run folder as a model, the lock,
and the resume check of the training settings."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from tiny_lm import run_config

from gem_fast.errors import UsageError
from gem_fast.run_dir import LOCK_NAME, claim_out_dir, model_source, run_lock, trained_chat_template
from gem_fast.train import lr_factor, train


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
