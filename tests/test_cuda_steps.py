"""CUDA only: the training engine's bf16 steps on a tiny model (autocast, Triton loss kernel, Liger layers
when installed), run on the GPU machine by bench/gpu_suite.sh; skipped elsewhere."""

from __future__ import annotations

import math

import pytest
import torch
from test_train import _naive_step0
from tiny_lm import run_config, write_run_inputs

from gem_fast.train import train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_sft_steps_on_cuda_start_at_the_fp32_cpu_loss(tmp_path):
    model_dir, data = write_run_inputs(tmp_path)
    cpu_loss, _ = _naive_step0(model_dir, data)  # full fp32 logits on the CPU, step 0's 4 rows
    result = train(run_config(model_dir, data, tmp_path / "run", batch_size=4, max_steps=2, export_hf=False))
    assert result.steps_done == 2 and all(math.isfinite(x) for x in result.losses)
    # bf16 autocast rounds the hidden states and the LM head's operands (8 mantissa bits): a few 1e-3.
    assert result.losses[0] == pytest.approx(float(cpu_loss), rel=2e-2)


def test_sega_step_on_cuda_samples_scores_and_trains(tmp_path):
    model_dir, data = write_run_inputs(tmp_path)
    cfg = run_config(model_dir, data, tmp_path / "run", objective="sega", k=2, gen_max_new_tokens=6,
                     final_span="last_fraction", max_steps=1, export_hf=False)
    records = []
    result = train(cfg, on_step=lambda step, record, policy: records.append(record))
    assert result.steps_done == 1 and math.isfinite(result.losses[0])
    assert records[0]["gen_len_mean"] > 0 and math.isfinite(records[0]["entropy_mean"])
