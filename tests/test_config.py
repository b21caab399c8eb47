"""The training config (gem_fast.config): the flat names round trip through the sections, the objective is
inferred from the fields named. Its command line and YAML errors: test_flags.py."""

from __future__ import annotations

import dataclasses

from gem_fast.config import TrainConfig


def test_flat_round_trip_and_objective_inference():
    cfg = TrainConfig.from_flat({"k": 5, "lr": 3e-4})
    assert cfg.run.objective == "sega"  # a SEGA field named: a SEGA YAML
    assert TrainConfig.from_flat(cfg.to_flat()) == cfg
    assert cfg.replace(resume=True).run == dataclasses.replace(cfg.run, resume=True)
    assert TrainConfig.from_flat({"lr": 3e-4}).run.objective == "sft"


def test_sega_round_trip_keeps_its_reward_temperature():
    """to_flat holds the pair section's beta beside reward_temperature; beta must not overwrite it."""
    cfg = TrainConfig.from_flat({"objective": "sega", "reward_temperature": 0.5})
    assert cfg.replace(k=3).sega.reward_temperature == 0.5
