"""The ablation runner end to end on a tiny model: every row trained, scored and tabulated, the plot written."""

from __future__ import annotations

import json

import pytest
from tiny_lm import write_run_inputs

from gem_fast.cli import ablation


@pytest.mark.slow  # a dozen subprocesses (SFT, calibration, five GEM rows, six evaluations)
def test_the_ablation_runner_writes_every_row(tmp_path, capsys):
    model_dir, pairs = write_run_inputs(tmp_path, n_pairs=8)
    rows = pairs.read_text().splitlines(keepends=True)
    labelled, unlabelled, heldout = (tmp_path / n for n in ("labelled.jsonl", "prompts.jsonl", "heldout.jsonl"))
    labelled.write_text("".join(rows[:4]))
    unlabelled.write_text("".join(json.dumps({"prompt": f"Q{i}: {i}+{i}="}) + "\n" for i in range(2)))
    heldout.write_text("".join(rows[4:]))
    out = tmp_path / "ablation"
    assert ablation.main(["--out_dir", str(out), "--model_name_or_path", str(model_dir), "--labelled_jsonl",
                          str(labelled), "--unlabelled_jsonl", str(unlabelled), "--eval_jsonl", str(heldout),
                          "--chat_template", "false", "--k", "2", "--gen_max_new_tokens", "4", "--batch", "2",
                          "--epochs", "1", "--max_length", "64", "--kernel_backend", "torch"]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [r["model"] for r in results["rows"]]
    assert names == ["SFT only", "full GEM", *ablation.VARIANTS]
    table = (out / "results.md").read_text()
    for r in results["rows"]:
        assert len(r.get("correct", [])) == 4 or "note" in r
        assert f"| {r['model']} |" in table
    assert (out / "ablation.png").stat().st_size > 0
    assert (out / "cognitive_filtering_dpo" / "filtered_pairs.jsonl").exists()
    gem_train = (out / "gem_train.jsonl").read_text().splitlines()
    assert len(gem_train) == 6 and "chosen" in gem_train[0] and "chosen" not in gem_train[-1]
    with pytest.raises(SystemExit):
        ablation.main(["--out_dir", str(out), "--model_name_or_path", str(model_dir)])  # not empty: refused
    assert "not empty" in capsys.readouterr().err
