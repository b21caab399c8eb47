"""bench/sample_rows.py --quick: a row per provider, the triton draws agreeing with torch's, the table."""

from __future__ import annotations

import json

import pytest

from bench import sample_rows as bench


@pytest.mark.slow
def test_benchmark_quick_mode_writes_every_provider(tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "sample_rows.json").read_text())
    assert {r["provider"] for r in doc["rows"]} == set(bench.PROVIDERS)
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in doc["rows"])
    assert [r["agree"] for r in doc["rows"] if r["provider"] == "gem_fast:triton"] == [1.0]
    assert "| 2 | 300 | float32 | 0.9 |" in (tmp_path / "sample_rows.md").read_text()
