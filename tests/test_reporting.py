"""The metrics path (gem_fast/reporting.py): metrics.jsonl and its resume truncation, the console line, the
--report_to sinks, and SEGA's samples.jsonl through the same JSONL writer."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import math
import sys
import types

import pytest
import torch
from tiny_lm import run_config, write_run_inputs

from gem_fast.advantages import sega_advantages
from gem_fast.errors import UsageError
from gem_fast.flags import parse_config
from gem_fast.reporting import JsonlLog, Reporter
import gem_fast.train as train_module
from gem_fast.train import train


class _FakeWandbRun:
    def __init__(self, **init):
        self.init, self.logged, self.finished = init, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in ``wandb`` module that records what it is sent."""
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.runs = []

    def init(**kwargs):
        module.runs.append(_FakeWandbRun(**kwargs))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_missing_sink_package_stops_before_the_model_loads(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as stop:
        parse_config(["--report_to", "wandb"], objective="sft", description="t")
    assert stop.value.code == 2
    assert "report_to wandb: the 'wandb' package is not installed (pip install wandb)" in capsys.readouterr().err
    model_dir, data = write_run_inputs(tmp_path, n_pairs=4)
    cfg = run_config(model_dir, data, tmp_path / "out", report_to="wandb")
    monkeypatch.setattr(train_module, "load_for_training", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match="'wandb' package is not installed"):
        train(cfg)


def test_sega_run_reports_its_records_and_logs_its_samples(tmp_path, fake_wandb):
    """wandb gets each metrics.jsonl record at its step; samples.jsonl holds step 2's prompts (every 2 steps),
    whose logged advantages are Eq. 2's of the logged Eq. 1 scores."""
    model_dir, data = write_run_inputs(tmp_path, n_pairs=4)
    out = tmp_path / "out"
    cfg = run_config(model_dir, data, out, objective="sega", k=3, gen_max_new_tokens=5, batch_size=2, max_steps=2,
                     export_hf=False, report_to="wandb", log_samples_every=2, reward_mapping="identity")
    train(cfg)
    (run,) = fake_wandb.runs
    assert run.finished and run.init["config"]["report_to"] == "wandb" and run.init["dir"] == str(out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in run.logged] == [r["step"] for r in records] == [1, 2]
    for (_, values), record in zip(run.logged, records):
        assert values == {f"train/{k}": v for k, v in record.items() if k != "step"}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    prompts = {json.loads(line)["prompt"] for line in data.read_text().splitlines()}
    assert len(samples) == 2 and {s["step"] for s in samples} == {2} and {s["prompt"] for s in samples} <= prompts
    for sample in samples:
        assert len(sample["candidates"]) == len(sample["scores"]) == len(sample["advantages"]) == 3
        scores = torch.tensor([-math.inf if s is None else s for s in sample["scores"]])
        expected = sega_advantages(scores[None], mapping="identity")[0]
        torch.testing.assert_close(torch.tensor(sample["advantages"]), expected)


def test_tensorboard_sink_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reporter = Reporter("tensorboard", tmp_path, {"lr": 1e-3})
    for step in (1, 2):
        reporter.log({"step": step, "loss": 1.0 / step, "lr": 1e-3})
    reporter.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5)]


def test_sample_log_drops_the_lines_a_resumed_run_samples_again(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"step": 2, "prompt": "a"}\n{"step": 4, "prompt": "b"}\n{"step": 6, "pro')  # torn by a kill
    log = JsonlLog(path)
    log.write([{"step": 4, "prompt": "c"}])
    log.write([{"step": 6, "prompt": "d"}])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in lines] == [(2, "a"), (4, "c"), (6, "d")]


def test_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_stops(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        JsonlLog(path).resume(2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n' and "torn last line" in caplog.text
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(UsageError, match="metrics.jsonl:2: not a JSON record"):
        JsonlLog(path).resume(2)


def test_progress_false_prints_no_step_lines_and_true_one_per_step(inputs, tmp_path, capsys):
    model_dir, data = inputs
    train(run_config(model_dir, data, tmp_path / "quiet", export_hf=False, progress=False))
    quiet = capsys.readouterr()
    assert "grad_norm" not in quiet.out + quiet.err
    train(run_config(model_dir, data, tmp_path / "shown", export_hf=False, progress=True))
    assert capsys.readouterr().out.count("grad_norm") == 3
