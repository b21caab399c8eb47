"""Meta-device initialisation (``--init meta``): the same losses as loading the whole model (``--init full``),
on one process, over 2 gloo ranks and under a 2-node torchrun rendezvous; the export in ``<out_dir>/final``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tiny_lm import join_gloo, run_config, write_run_inputs

from gem_fast import models
from gem_fast.distributed import free_port
from gem_fast.checkpoint import export_hf
from gem_fast.models import choose_init, load_model, load_model_and_tokenizer
from gem_fast.train import train

ROOT = Path(__file__).resolve().parents[1]
# fp32 on CPU: both inits hold the same weights, so the losses agree to reduction order at most.
LOSS_TOL = dict(rtol=1e-6, atol=1e-7)


def test_choose_init_picks_meta_for_sharded_safetensors_folders(tmp_path):
    model_dir, _ = write_run_inputs(tmp_path, n_pairs=1)
    assert choose_init("auto", str(model_dir), sharded=True) == model_dir
    assert choose_init("meta", str(model_dir), sharded=False) == model_dir
    assert choose_init("auto", str(model_dir), sharded=False) is None
    assert choose_init("full", str(model_dir), sharded=True) is None
    assert choose_init("auto", "org/not-a-local-folder", sharded=True) is None
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="model.gguf is not a local Hugging Face folder"):
        choose_init("meta", str(gguf), sharded=True)


def test_meta_init_trains_like_full_and_exports_in_the_asked_dtype(tmp_path):
    model_dir, data = write_run_inputs(tmp_path, n_pairs=8)
    meta = train(run_config(model_dir, data, tmp_path / "meta", batch_size=4, max_steps=2, init="meta",
                            export_dtype="bf16"))
    full = train(run_config(model_dir, data, tmp_path / "full", batch_size=4, max_steps=2, init="full"))
    torch.testing.assert_close(torch.tensor(meta.losses), torch.tensor(full.losses), **LOSS_TOL)
    # The export sits in final/, apart from the run's bookkeeping, in the dtype asked for (auto on CPU: fp32).
    assert (tmp_path / "meta" / "metrics.jsonl").is_file() and not (tmp_path / "meta" / "model.safetensors").exists()
    meta_w, full_w = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("meta", "full"))
    assert {w.dtype for w in meta_w.values()} == {torch.bfloat16} and {w.dtype for w in full_w.values()} == {torch.float32}
    assert meta_w.keys() == full_w.keys() and "lm_head.weight" not in meta_w  # tied: written once
    for name, weight in full_w.items():
        torch.testing.assert_close(meta_w[name], weight.to(torch.bfloat16), msg=lambda m: f"{name}: {m}")
    reloaded = load_model(tmp_path / "meta" / "final", dtype=torch.bfloat16)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert json.loads((tmp_path / "meta" / "final" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_splits_into_indexed_files_that_reload(tmp_path):
    model_dir, _ = write_run_inputs(tmp_path, n_pairs=1)
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    folder = export_hf(model, tokenizer, tmp_path / "final", dtype=torch.float32, max_file_bytes=20_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    reloaded = load_model(folder)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    for name, weight in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], weight), name


def _worker(rank: int, world: int, port: int, model_dir: Path, data: Path, root: Path) -> None:
    join_gloo(rank, world, port)
    try:
        # The embedded GGUF's conversion (stood in for by a slow marker file): local rank 0 only, the other waits.
        def convert() -> None:
            time.sleep(0.5)
            (root / f"converted_by_rank{rank}").touch()

        models.embedded_model_dir = convert
        models.convert_embedded_once()
        converted = sorted(p.name for p in root.glob("converted_by_*"))
        losses = {init: train(run_config(model_dir, data, root / init, batch_size=2, max_steps=2, init=init,
                                         activation_checkpointing=True)).losses
                  for init in ("meta", "full")}
        if rank == 0:
            torch.save({"losses": losses, "converted_seen_by_rank0": converted}, root / "rank0.pt")
        else:
            torch.save(converted, root / "converted_seen_by_rank1.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_meta_init_on_two_ranks_trains_like_full_and_one_rank_converts(tmp_path):
    model_dir, data = write_run_inputs(tmp_path, n_pairs=8)
    mp.spawn(_worker, args=(2, free_port(), model_dir, data, tmp_path), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    # Rank 1 passed the barrier only after rank 0 had converted; it did not convert itself.
    assert rank0["converted_seen_by_rank0"] == torch.load(tmp_path / "converted_seen_by_rank1.pt") == [
        "converted_by_rank0"]
    losses = rank0["losses"]
    print("2-rank losses, meta:", losses["meta"], "full:", losses["full"])
    torch.testing.assert_close(torch.tensor(losses["meta"]), torch.tensor(losses["full"]), **LOSS_TOL)
    meta_w, full_w = (load_file(tmp_path / init / "final" / "model.safetensors") for init in ("meta", "full"))
    assert meta_w.keys() == full_w.keys()
    for name, weight in full_w.items():
        torch.testing.assert_close(meta_w[name], weight, **LOSS_TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_two_node_torchrun_rendezvous_on_localhost(tmp_path):
    """The README's multi-node command, as two torchrun agents (one process each) meeting at a c10d
    rendezvous on localhost; the run it starts trains like one process over the same global batch."""
    model_dir, data = write_run_inputs(tmp_path, n_pairs=4)
    out = tmp_path / "two_nodes"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{free_port()}", "--rdzv_id", "two-nodes",
              str(ROOT / "scripts/train_sft.py"), "--model_name_or_path", str(model_dir), "--train_jsonl", str(data),
              "--out_dir", str(out), "--batch_size", "2", "--max_steps", "1", "--lr", "3e-3", "--progress", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
              for _ in range(2)]
    logs = [agent.communicate(timeout=240)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(logs)
    assert "model init meta" in "".join(logs)  # sharded + a safetensors folder: auto chose meta
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    single = train(run_config(model_dir, data, tmp_path / "single", batch_size=4, max_steps=1, init="full",
                              export_hf=False))
    torch.testing.assert_close(torch.tensor(record["loss"]), torch.tensor(single.losses[0]), rtol=1e-5, atol=1e-6)
    assert (out / "final" / "model.safetensors").is_file()
