"""User errors as one line (exit 2) before any model loads: training flags, YAML, paths and data, the eval
and data-preparation scripts, the planners and the Hub (gem_fast/errors.py and the checks that raise its errors)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
from cli_runs import one_line_error, train_sega, train_sft

import gem_fast.train as train_module
from gem_fast import models
from gem_fast.cli import eval_pref_accuracy, plan_kernel, plan_memory, prepare_data
from gem_fast.errors import UsageError


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
    entry = train_sega if case in ("sega_k_1", "top_m_above_1", "yaml_wrong_type") else train_sft
    err = one_line_error(capsys, 2, lambda: entry(base + argv))
    assert expected.format(tmp=tmp_path) in err
    assert not (tmp_path / "out").exists()


def test_debug_flag_and_env_show_the_traceback(inputs, monkeypatch):
    with pytest.raises(UsageError, match="--batch_size 0"):
        train_sft(["--batch_size", "0", "--debug"])
    monkeypatch.setenv("GEM_FAST_DEBUG", "1")
    with pytest.raises(UsageError, match="--batch_size 0"):
        train_sft(["--batch_size", "0"])


def test_eval_and_prepare_refuse_to_overwrite_and_check_outputs_first(inputs, tmp_path, capsys, monkeypatch):
    model_dir, data = inputs
    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    assert eval_pref_accuracy.default_output(str(model_dir), data) == model_dir / "pref_accuracy-pairs.json"
    assert eval_pref_accuracy.default_output(None, data) == Path("outputs/pref_accuracy/embedded-smollm2-pairs.json")
    report = model_dir / "pref_accuracy-pairs.json"
    report.write_text("{}")
    try:
        err = one_line_error(capsys, 2, lambda: eval_pref_accuracy.main(
            ["--model_name_or_path", str(model_dir), "--eval_jsonl", str(data)]))
        assert f"{report}: exists; pass --overwrite to replace it, or choose another --output_json" in err
    finally:
        report.unlink()
    (tmp_path / "a_file").write_text("")
    err = one_line_error(capsys, 2, lambda: eval_pref_accuracy.main(
        ["--model_name_or_path", str(model_dir), "--eval_jsonl", str(data),
         "--output_json", str(tmp_path / "a_file" / "report.json")]))
    assert f"--output_json {tmp_path / 'a_file' / 'report.json'}: {tmp_path / 'a_file'} is a file, not a folder" in err
    err = one_line_error(capsys, 2, lambda: eval_pref_accuracy.main(["--eval_jsonl", str(tmp_path / "none.jsonl")]))
    assert "--eval_jsonl" in err and "no such file" in err

    argv = ["--input", str(data), "--out_dir", str(tmp_path / "split"), "--test_fraction", "0.25"]
    assert prepare_data.main(argv) == 0
    train_file = tmp_path / "split" / "train.jsonl"
    kept = train_file.read_text()
    err = one_line_error(capsys, 2, lambda: prepare_data.main(argv))
    assert f"{train_file}: exists; pass --overwrite to replace it, or choose another --out_dir" in err and train_file.read_text() == kept
    assert prepare_data.main([*argv, "--overwrite", "--seed", "1"]) == 0
    err = one_line_error(capsys, 2, lambda: prepare_data.main(["--input", str(tmp_path / "x.jsonl"),
                                                                 "--out_dir", str(tmp_path)]))
    assert "--input" in err and "no such file" in err


def test_planners_report_bad_input_as_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 2\nk: [3\n")
    err = one_line_error(capsys, 2, lambda: plan_memory.main(["--config", str(bad)]))
    assert f"{bad}:3: invalid YAML" in err
    err = one_line_error(capsys, 2, lambda: plan_memory.main(["--model", str(tmp_path / "none.json")]))
    assert "none.json" in err
    with pytest.raises(SystemExit) as exit_info:
        plan_kernel.main(["--tokens", "0"])
    assert exit_info.value.code == 2 and "--tokens: must be > 0, got 0" in capsys.readouterr().err


def test_a_hub_id_the_hub_cannot_provide_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(UsageError, match=r"^model someorg/somemodel: not a local folder, and the Hugging Face Hub "
                                         r"did not provide it \(We couldn't connect .* to load the files.\);"):
        models.load_tokenizer("someorg/somemodel")
