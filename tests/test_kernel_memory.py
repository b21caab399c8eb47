"""Peak memory of the chunked path vs the naive one, at SmolLM2's sizes, on the CPU.

Peak RSS of a fresh subprocess is deterministic enough at these sizes (GBs vs hundreds of MB);
with CUDA, ``torch.cuda.max_memory_allocated`` would be the measure (see bench/).
"""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROBE = Path(__file__).with_name("peak_rss_probe.py")
N, H, V = 4096, 576, 49152  # SmolLM2-135M: hidden 576, vocab 49152


def peak_extra_bytes(backend: str) -> int:
    out = subprocess.run(
        [sys.executable, str(PROBE), backend, str(N), str(H), str(V)],
        check=True, capture_output=True, text=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_torch_path_peak_memory_is_a_tenth_of_naive():
    naive, chunked = peak_extra_bytes("naive"), peak_extra_bytes("torch")
    logits_bytes = N * V * 4
    # The naive path holds several [N, V] float32 tensors at once; the chunked one none.
    assert naive > 2 * logits_bytes, naive
    assert chunked * 10 <= naive, (chunked, naive)
