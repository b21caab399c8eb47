"""The training scripts' command line (gem_fast.flags): flat flags and YAML keys into typed sections, nested YAML,
SEGA's --beta alias, the transformers aliases, bounds and one-line usage errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from gem_fast.config import TrainConfig, read_yaml
from gem_fast.errors import UsageError
from gem_fast.flags import parse_config


def test_flat_flags_land_in_their_sections():
    cfg = parse_config(["--lr", "2e-3", "--batch_size", "3", "--kernel_backend", "torch", "--resume"],
                       objective="sft", description="t")
    assert (cfg.optim.lr, cfg.run.batch_size, cfg.parallel.kernel_backend, cfg.run.resume) == (2e-3, 3, "torch", True)
    assert cfg.run.objective == "sft" and cfg.sampling == TrainConfig().sampling


def test_beta_is_the_reward_temperature_for_sega_and_the_dpo_beta_otherwise(tmp_path):
    sega = parse_config(["--beta", "0.5"], objective="sega", description="t")
    assert (sega.sega.reward_temperature, sega.pair.beta) == (0.5, TrainConfig().pair.beta)
    dpo = parse_config(["--objective", "dpo", "--beta", "0.1"], objective="sft", description="t")
    assert (dpo.pair.beta, dpo.sega.reward_temperature) == (0.1, TrainConfig().sega.reward_temperature)
    config = tmp_path / "sega.yaml"
    config.write_text("beta: 2.0\nk: 3\n")
    from_yaml = parse_config(["--config", str(config)], objective="sega", description="t")
    assert (from_yaml.sega.reward_temperature, from_yaml.sampling.k) == (2.0, 3)


def test_nested_yaml_equals_flat_yaml_and_flags_win(tmp_path):
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text("lr: 1e-3\nbatch_size: 2\nranking: trueskill\n")
    nested.write_text("optim: {lr: 1e-3}\nrun: {batch_size: 2}\nsega: {ranking: trueskill}\n")
    assert read_yaml(flat) == read_yaml(nested)
    cfg = parse_config(["--config", str(nested), "--batch_size", "4"], objective="sega", description="t")
    assert (cfg.optim.lr, cfg.run.batch_size, cfg.sega.ranking) == (1e-3, 4, "trueskill")


def test_bad_values_and_keys_stop_with_a_message(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("ranking: elo\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(config)], objective="sega", description="t")
    assert "ranking must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--length_normalize"], objective="sega", description="t")  # a pair flag
    with pytest.raises(KeyError, match="nonsense"):
        TrainConfig.from_flat({"nonsense": 1})
    nested = tmp_path / "nested.yaml"
    nested.write_text("pair: {beta: 0.1}\n")  # DPO's beta, not SEGA's reward temperature
    with pytest.raises(UsageError, match="'pair' is not a config section here"):
        parse_config(["--config", str(nested)], objective="sega", description="t")
    nested.write_text("sega: {lr: 0.1}\n")
    with pytest.raises(ValueError, match="unknown keys \\['lr'\\] in section 'sega'"):
        read_yaml(nested)


def test_help_comes_from_the_field_docs(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"], objective="sega", description="t")
    out = capsys.readouterr().out
    assert "--reward_temperature" in out and "softmax temperature T of the reward mapping" in out


def test_transformers_names_are_aliases_and_may_not_meet_their_field(tmp_path, capsys):
    hf = ["--learning_rate", "3e-4", "--output_dir", "o", "--per_device_train_batch_size", "2",
          "--gradient_accumulation_steps", "3", "--num_train_epochs", "4"]
    cfg = parse_config(hf, objective="sft", description="t")
    run = cfg.run
    assert (cfg.optim.lr, run.out_dir, run.batch_size, run.grad_accum, run.epochs) == (3e-4, "o", 2, 3, 4)
    config = tmp_path / "hf.yaml"
    config.write_text("learning_rate: 1e-3\nnum_train_epochs: 2\n")
    from_yaml = parse_config(["--config", str(config), "--lr", "2e-3"], objective="sega", description="t")
    assert (from_yaml.optim.lr, from_yaml.run.epochs) == (2e-3, 2)  # a flag wins over the YAML alias
    with pytest.raises(SystemExit):
        parse_config(["--lr", "1e-3", "--learning_rate", "2e-3"], objective="sft", description="t")
    assert "--lr and --learning_rate set the same field" in capsys.readouterr().err
    config.write_text("output_dir: a\nout_dir: b\n")
    with pytest.raises(UsageError, match=f"{config}: keys output_dir and out_dir set the same field"):
        parse_config(["--config", str(config)], objective="sft", description="t")
    with pytest.raises(ValueError, match="learning_rate and lr"):
        TrainConfig.from_flat({"learning_rate": 1e-3, "lr": 1e-4})


def test_every_flag_has_help_under_its_section(capsys):
    for objective in ("sft", "sega"):
        with pytest.raises(SystemExit):
            parse_config(["--help"], objective=objective, description="t")
        out = capsys.readouterr().out
        assert "--learning_rate LR" in out and "--per_device_train_batch_size" in out
        assert ("\nsampling:" in out) == (objective == "sega") and "\noptim:" in out
    for section in typing.get_type_hints(TrainConfig).values():
        for f in dataclasses.fields(section):
            assert len(f.metadata["help"].split()) >= 4, f.name


def _usage_error(capsys, argv: list[str], parse=None) -> str:
    """The one stderr line a usage error prints (exit 2, no usage block)."""
    with pytest.raises(SystemExit) as exit_info:
        (parse or (lambda a: parse_config(a, objective="sega", description="t")))(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "usage:" not in err, err
    return err


def test_an_unknown_flag_names_the_closest_one_and_prefixes_are_not_flags(capsys):
    assert "unknown flag --lamda_fork (did you mean --lambda_fork?)" in _usage_error(capsys, ["--lamda_fork", "0.4"])
    assert "unknown flag --gen_max_new_token (did you mean --gen_max_new_tokens?)" in _usage_error(
        capsys, ["--gen_max_new_token=3"])
    assert "unknown flag --zzz" in _usage_error(capsys, ["--zzz"])
    assert "expected true or false, got 'maybe'" in _usage_error(capsys, ["--resume", "maybe"])


def test_a_yaml_value_of_the_wrong_type_names_file_and_line(tmp_path, capsys):
    config = tmp_path / "typed.yaml"
    for text, expected in [("lr: 1e-5\nk: four\n", ":2: k must be an integer, got 'four'"),
                           ("sampling:\n  top_p: 0.9\n  k: 2.5\n", ":3: k must be an integer, got 2.5"),
                           ("chat_template: maybe\n", ":1: chat_template must be true or false, got 'maybe'"),
                           ("lr: [1]\n", ":1: lr must be a number, got [1]"),
                           ("out_dir: [a, b]\n", ":1: out_dir must be a single value")]:
        config.write_text(text)
        assert f"{config}{expected}" in _usage_error(capsys, ["--config", str(config)])
    config.write_text("lr: 1e-5\nchat_template: yes\nk: '3'\n")  # YAML 1.1 strings taken as meant
    cfg = parse_config(["--config", str(config)], objective="sega", description="t")
    assert (cfg.optim.lr, cfg.run.chat_template, cfg.sampling.k) == (1e-5, True, 3)


@pytest.mark.parametrize("argv, expected", [(["--top_m", "5"], "--top_m 5.0: must be <= 1"),
                                            (["--top_m", "0"], "--top_m 0.0: must be > 0"),
                                            (["--final_fraction", "1.5"], "--final_fraction 1.5: must be <= 1"),
                                            (["--log_samples_every", "-1"], "--log_samples_every -1: must be >= 0")])
def test_bounds_are_the_ones_the_help_states(argv, expected):
    with pytest.raises(UsageError, match=expected):
        parse_config(argv, objective="sega", description="t")


def test_booleans_are_spelled_the_same_in_every_script():
    from gem_fast.cli import eval_pref_accuracy, gates

    parsers = {"train": lambda a: parse_config(a, objective="sft", description="t").run.chat_template,
               "eval": lambda a: eval_pref_accuracy.parse_args(["--eval_jsonl", "x", *a]).chat_template,
               "gates": lambda a: gates.parse_args(["--train_jsonl", "x", *a]).chat_template}
    for name, chat_template in parsers.items():
        assert [chat_template(a) for a in (["--chat_template"], ["--chat_template", "true"],
                                           ["--chat_template", "no"], ["--chat_template=off"])] == [
            True, True, False, False], name


def test_the_scripts_parse_their_arguments_without_importing_torch():
    # A fresh interpreter: this one has torch loaded already.
    probe = ("import sys; from gem_fast import cli; from gem_fast.cli import eval_pref_accuracy, gates, plan_memory; "
             "plan_memory.build_parser().parse_args(['--world_size', '8']); "
             "from gem_fast.flags import parse_config; "
             "parse_config(['--k', '3', '--lr', '1e-5'], objective='sega', description='t'); "
             "eval_pref_accuracy.parse_args(['--eval_jsonl', 'x']); gates.parse_args(['--train_jsonl', 'x']); "
             "print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stderr
