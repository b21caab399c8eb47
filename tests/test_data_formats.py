"""Dataset formats (gem_fast.data.formats): per-dataset formats, auto-detection, row errors, prompt split, the
prepare_data CLI; and the file types of gem_fast.data.files (JSON, Parquet, datasets folders) read through them."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_lm import char_tokenizer

from gem_fast.data.formats import (
    FORMATS,
    check_disjoint,
    detect_file_format,
    detect_format,
    load_pairs,
    render_prompt,
    split_pairs,
    write_pairs_jsonl,
)
from gem_fast.data.files import iter_rows
from gem_fast.data import PreferencePair, load_preference_jsonl

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_FORMATS = {
    "pairs.jsonl": "pairs",
    "ultrafeedback_binarized.jsonl": "ultrafeedback",
    "pku_saferlhf.jsonl": "pku_saferlhf",
    "rewardbench.json": "rewardbench",
    "skywork.jsonl": "skywork",
    "icliniq.jsonl": "icliniq",
}
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def fixture_rows(name: str) -> list[dict]:
    return [row for _, row in iter_rows(FIXTURES / name)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


GOOD = {"prompt": "q", "chosen": "a", "rejected": "b"}
CONV = {
    "chosen": msgs(("user", "q"), ("assistant", "a")),
    "rejected": msgs(("user", "q"), ("assistant", "b")),
}
PKU = {"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 1}
ICLINIQ = {"question": "q", "answer_pos": "a", "answer_neg": "b"}
SKY = {"format": "skywork"}


# ---------------------------------------------------------------- each format on its fixture


def test_pairs_fixture():
    assert load_pairs(FIXTURES / "pairs.jsonl", format="pairs") == [
        PreferencePair("What is 7 times 6?", "7 times 6 is 42.", "7 times 6 is 36.", None),
        PreferencePair("Name a prime number between 10 and 14.", "11 (13 also works).", "12.", "math"),
    ]


def test_ultrafeedback_fixture_takes_the_user_turn_and_assistant_replies():
    first, second = load_pairs(FIXTURES / "ultrafeedback_binarized.jsonl", format="ultrafeedback")
    assert first == PreferencePair(
        "Write a haiku about autumn leaves.",
        "Red leaves drift and fall\nwhispering to the cold ground\nautumn says goodbye",
        "Leaves are nice in autumn.",
        None,
    )
    assert second.prompt == "Explain in one sentence why the sky looks blue."
    assert second.rejected == "Because it reflects the ocean."


def test_pku_saferlhf_fixture_better_and_safer():
    rows = fixture_rows("pku_saferlhf.jsonl")
    better = load_pairs(FIXTURES / "pku_saferlhf.jsonl", format="pku_saferlhf")
    safer = load_pairs(FIXTURES / "pku_saferlhf.jsonl", format="pku_saferlhf", preference="safer")
    # Row 0: the helpful-but-unsafe answer is "better", the refusal is "safer".
    assert better[0] == PreferencePair(rows[0]["prompt"], rows[0]["response_0"], rows[0]["response_1"], None)
    assert safer[0] == PreferencePair(rows[0]["prompt"], rows[0]["response_1"], rows[0]["response_0"], None)
    basil = PreferencePair(rows[1]["prompt"], rows[1]["response_1"], rows[1]["response_0"])
    assert better[1] == safer[1] == basil
    assert load_pairs(FIXTURES / "pku_saferlhf.jsonl", preference="better") == better


def test_rewardbench_fixture_keeps_subset():
    pairs = load_pairs(FIXTURES / "rewardbench.json", format="rewardbench")
    assert pairs[0] == PreferencePair("Reverse the string 'gem'.", "'meg'", "'gme'", "hep-python")
    assert [p.subset for p in pairs] == ["hep-python", "refusals-dangerous"]
    assert pairs[1].chosen == "I can't help with breaking into someone's home."


def test_skywork_fixture_single_and_multi_turn():
    single, multi = load_pairs(FIXTURES / "skywork.jsonl", format="skywork")
    assert single == PreferencePair(
        "Is 91 a prime number?", "No. 91 = 7 x 13.", "Yes, 91 is prime.", "magpie_ultra"
    )
    assert multi == PreferencePair(
        "user: Suggest a name for a grey cat.\nassistant: How about Smokey?\n"
        "user: Something shorter?\nassistant:",
        "Ash.",
        "Smokey the Magnificent.",
        "helpsteer2",
    )


def test_icliniq_fixture():
    rows = fixture_rows("icliniq.jsonl")
    pairs = load_pairs(FIXTURES / "icliniq.jsonl", format="icliniq")
    assert pairs == [PreferencePair(r["question"], r["answer_pos"], r["answer_neg"], None) for r in rows]
    assert pairs[1].prompt == "Can I take ibuprofen together with paracetamol for a headache?"


# ---------------------------------------------------------------- auto-detection


@pytest.mark.parametrize("name, fmt", FIXTURE_FORMATS.items())
def test_auto_detection_matches_the_named_format(name, fmt):
    assert detect_file_format(FIXTURES / name) == fmt
    assert load_pairs(FIXTURES / name) == load_pairs(FIXTURES / name, format=fmt)


def test_detection_prefers_the_format_with_more_fields():
    row = {"prompt": "q", "chosen": "a", "rejected": "b", "subset": "s"}
    assert detect_format(row, "x") == "rewardbench"
    assert detect_format({k: row[k] for k in ("prompt", "chosen", "rejected")}, "x") == "pairs"
    assert detect_format(CONV, "x") == "skywork"
    assert detect_format({**CONV, "prompt": "q"}, "x") == "ultrafeedback"


def test_every_format_is_detectable_from_its_fixture():
    assert set(FIXTURE_FORMATS.values()) == set(FORMATS)


# ---------------------------------------------------------------- bad rows name file and row



@pytest.mark.parametrize(
    "second_row, kwargs, problem",
    [
        ({"prompt": "q", "chosen": "a"}, {}, "missing field 'rejected'"),
        ({**GOOD, "chosen": 3}, {}, "field 'chosen' must be a string, got int"),
        ({**GOOD, "rejected": "  \n"}, {}, "field 'rejected' is empty"),
        ({**GOOD, "prompt": ""}, {}, "field 'prompt' is empty"),
        ({**GOOD, "subset": 7}, {}, "field 'subset' must be a string"),
        ([1, 2], {}, "expected an object with named fields, got list"),
        ({**CONV, "rejected": msgs(("user", "q"), ("assistant", " "))}, SKY, "empty final assistant"),
        ({**CONV, "rejected": msgs(("user", "other"), ("assistant", "b"))}, SKY, "differ before"),
        ({**CONV, "chosen": [*CONV["chosen"], {"role": "user", "content": "?"}]}, SKY, "ends with a 'user'"),
        ({**CONV, "chosen": [{"role": "user"}, *CONV["chosen"][1:]]}, SKY, "chosen[0] must be"),
        ({**CONV, "chosen": "a"}, SKY, "'chosen' must be a non-empty list of messages"),
        ({**CONV, "prompt": "not q"}, {"format": "ultrafeedback"}, "'prompt' does not match the first user"),
        ({"chosen": msgs(("assistant", "a")), "rejected": msgs(("assistant", "b"))}, SKY, "no prompt"),
        ({k: msgs(("user", " "), ("assistant", k)) for k in ("chosen", "rejected")}, SKY, "prompt is empty"),
        ({**PKU, "better_response_id": 2}, {"format": "pku_saferlhf"}, "must be 0 or 1, got 2"),
        (
            {**PKU, "safer_response_id": True},
            {"format": "pku_saferlhf", "preference": "safer"},
            "'safer_response_id' must be 0 or 1, got True",
        ),
        ({"question": "q", "answer_pos": "a"}, {"format": "icliniq"}, "missing field 'answer_neg'"),
    ],
)
def test_bad_jsonl_row_names_file_line_and_problem(tmp_path, second_row, kwargs, problem):
    valid = {"skywork": CONV, "ultrafeedback": {**CONV, "prompt": "q"}, "pku_saferlhf": PKU}
    valid["icliniq"] = ICLINIQ
    first_row = valid.get(kwargs.get("format"), GOOD)
    path = tmp_path / "data.jsonl"
    # A blank line between the rows: line numbers count it, as an editor would.
    path.write_text(json.dumps(first_row) + "\n\n" + json.dumps(second_row) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_pairs(path, **kwargs)
    assert str(err.value).startswith(f"{path}:3: ")
    assert problem in str(err.value)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}:2: invalid JSON"):
        load_pairs(path)


def test_auto_detection_errors_name_the_row(tmp_path):
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"instruction": "q", "output": "a"}])
    fields = r"fields \['instruction', 'output'\]"
    with pytest.raises(ValueError, match=rf"^{unknown}:1: unknown format: {fields} fit none"):
        load_pairs(unknown)
    ambiguous = write_jsonl(tmp_path / "ambiguous.jsonl", [{**GOOD, **ICLINIQ}])
    with pytest.raises(ValueError, match=rf"^{ambiguous}:1: ambiguous format: .* fit \['pairs', 'icliniq'\]"):
        load_pairs(ambiguous)
    assert load_pairs(ambiguous, format="icliniq") == [PreferencePair("q", "a", "b")]


def test_later_rows_are_held_to_the_detected_format(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, ICLINIQ])
    with pytest.raises(ValueError, match=rf"^{path}:2: missing field 'prompt'"):
        load_pairs(path)


def test_bad_arguments(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD])
    with pytest.raises(ValueError, match=rf"^{path}: unknown format 'hh'; expected 'auto' or one of"):
        load_pairs(path, format="hh")
    with pytest.raises(ValueError, match=rf"^{path}: unknown preference 'kinder'"):
        load_pairs(path, preference="kinder")
    with pytest.raises(ValueError, match="applies to format 'pku_saferlhf' only, not 'pairs'"):
        load_pairs(path, format="pairs", preference="safer")
    with pytest.raises(ValueError, match=rf"^{path}:1: preference= applies to format 'pku_saferlhf' only"):
        load_pairs(path, preference="safer")  # detected as pairs
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match=rf"^{csv}: unsupported file type '.csv'"):
        load_pairs(csv)


def test_json_list_rows_are_named_by_index(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "chosen": None}]), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}\[1\]: field 'chosen' must be a string, got NoneType"):
        load_pairs(path)
    path.write_text(json.dumps([GOOD]) + "]", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}: invalid JSON at line 1"):
        load_pairs(path)


def test_json_file_holding_json_lines(tmp_path):
    # datasets' Dataset.to_json writes one object per line even under a .json name.
    path = write_jsonl(tmp_path / "export.json", [GOOD, {**GOOD, "prompt": "r"}])
    assert [p.prompt for p in load_pairs(path)] == ["q", "r"]


# ---------------------------------------------------------------- parquet and datasets folders


def write_parquet(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))  # rows may lack optional fields
    pq.write_table(pa.Table.from_pydict({c: [row.get(c) for row in rows] for c in columns}), path)
    return path


@pytest.mark.parametrize("name", FIXTURE_FORMATS)
def test_parquet_round_trip(tmp_path, name):
    path = write_parquet(tmp_path / "data.parquet", fixture_rows(name))
    assert load_pairs(path) == load_pairs(FIXTURES / name)


def test_parquet_bad_row_named_by_index(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", [GOOD, GOOD, {**GOOD, "rejected": ""}])
    with pytest.raises(ValueError, match=rf"^{path}\[2\]: field 'rejected' is empty"):
        load_pairs(path)


def test_unreadable_parquet_names_the_file(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_text("not parquet")
    with pytest.raises(ValueError, match=rf"^{path}: not a readable Parquet file"):
        load_pairs(path)


def saved_dataset_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    return folder


def test_datasets_folder_without_the_library(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails even where it is installed
    folder = saved_dataset_folder(tmp_path)
    message = rf"^{folder}: reading a Hugging Face datasets folder needs the 'datasets' library"
    with pytest.raises(ImportError, match=message):
        load_pairs(folder)
    with pytest.raises(ValueError, match="not one saved by datasets' save_to_disk"):
        load_pairs(tmp_path)


def test_datasets_folder_splits(tmp_path, monkeypatch):
    splits = {"train": [GOOD], "test": [{**GOOD, "prompt": "t"}, {**GOOD, "chosen": 1}]}
    # Stands in for datasets.load_from_disk: a DatasetDict is a dict of iterables of row dicts.
    fake = types.SimpleNamespace(load_from_disk=lambda path: splits)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    folder = saved_dataset_folder(tmp_path)
    with pytest.raises(ValueError, match=r"choose a split with split=, one of \['test', 'train'\]"):
        load_pairs(folder)
    assert load_pairs(folder, split="train") == [PreferencePair("q", "a", "b")]
    with pytest.raises(ValueError, match=rf"^{folder}\[test\]\[1\]: field 'chosen' must be a string"):
        load_pairs(folder, split="test")
    with pytest.raises(ValueError, match="applies to datasets folders only"):
        load_pairs(FIXTURES / "pairs.jsonl", split="train")


# ---------------------------------------------------------------- chat templates


@pytest.fixture(scope="module")
def templated_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_chat_template_renders_the_conversation(templated_tokenizer):
    single, multi = load_pairs(FIXTURES / "skywork.jsonl", tokenizer=templated_tokenizer)
    assert single.prompt == "<user>Is 91 a prime number?\n<assistant>"
    assert multi.prompt == (
        "<user>Suggest a name for a grey cat.\n<assistant>How about Smokey?\n"
        "<user>Something shorter?\n<assistant>"
    )
    assert (multi.chosen, multi.rejected) == ("Ash.", "Smokey the Magnificent.")
    # String prompts go through the same template, so every format yields the same kind of prompt.
    assert load_pairs(FIXTURES / "icliniq.jsonl", tokenizer=templated_tokenizer)[1].prompt == (
        "<user>Can I take ibuprofen together with paracetamol for a headache?\n<assistant>"
    )


def test_render_prompt_without_template():
    assert render_prompt(msgs(("user", "hi"))) == "hi"
    conversation = msgs(("system", "be brief"), ("user", "hi"))
    assert render_prompt(conversation) == "system: be brief\nuser: hi\nassistant:"
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(msgs(("user", "hi")), char_tokenizer())


# ---------------------------------------------------------------- train/test split


def grouped_pairs() -> list[PreferencePair]:
    """40 prompts; every third has three pairs, one of them with extra whitespace in the prompt."""
    pairs = []
    for i in range(40):
        prompt = f"question {i}"
        pairs.append(PreferencePair(prompt, f"good {i}", f"bad {i}", "s"))
        if i % 3 == 0:
            pairs.append(PreferencePair(prompt, f"better {i}", f"worse {i}"))
            pairs.append(PreferencePair(f"  question  {i}\n", f"fine {i}", f"poor {i}"))
    return pairs


def test_split_keeps_prompts_on_one_side_and_is_deterministic():
    pairs = grouped_pairs()
    train, test = split_pairs(pairs, 0.25, seed=3)
    check_disjoint(train, test)
    assert sorted(map(repr, train + test)) == sorted(map(repr, pairs))
    target = round(0.25 * len(pairs))
    assert target <= len(test) <= target + 2  # whole groups of 1 or 3 pairs overshoot by at most 2
    assert train == [p for p in pairs if p in train]  # input order kept
    assert test == [p for p in pairs if p in test]
    assert split_pairs(pairs, 0.25, seed=3) == (train, test)
    assert any(split_pairs(pairs, 0.25, seed=s)[1] != test for s in range(4, 8))


def test_split_errors():
    pairs = grouped_pairs()
    for fraction in (0, 1, -0.1):
        with pytest.raises(ValueError, match="test_fraction must be in"):
            split_pairs(pairs, fraction, 0)
    with pytest.raises(ValueError, match="at least 2 distinct prompts"):
        split_pairs([PreferencePair("q", "a", "b"), PreferencePair(" q ", "c", "d")], 0.5, 0)
    train, test = split_pairs(pairs[:4], 0.99, 0)  # one group always stays in train
    assert train and test


def test_check_disjoint_names_a_shared_prompt():
    train = [PreferencePair("What is 2+2?", "4", "5"), PreferencePair("unique", "a", "b")]
    test = [PreferencePair("What is  2+2? ", "four", "five")]
    message = r"^1 prompt\(s\) appear in both train and test, e\.g\. 'What is 2\+2\?'"
    with pytest.raises(ValueError, match=message):
        check_disjoint(train, test)
    check_disjoint(train[1:], test)


def test_written_pairs_read_back_with_the_jsonl_loader(tmp_path):
    pairs = load_pairs(FIXTURES / "skywork.jsonl") + load_pairs(FIXTURES / "pairs.jsonl")
    write_pairs_jsonl(pairs, tmp_path / "out" / "pairs.jsonl")
    assert load_preference_jsonl(tmp_path / "out" / "pairs.jsonl") == pairs


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def script():
    from gem_fast.cli import prepare_data

    return prepare_data


def test_prepare_data_cli(tmp_path, capsys, script):
    rows = [{"question": p.prompt, "answer_pos": p.chosen, "answer_neg": p.rejected} for p in grouped_pairs()]
    source = write_parquet(tmp_path / "icliniq.parquet", rows)
    out = tmp_path / "prepared"
    argv = ["--input", str(source), "--out_dir", str(out), "--test_fraction", "0.2", "--seed", "1"]
    assert script.main(argv) == 0
    train, test = load_preference_jsonl(out / "train.jsonl"), load_preference_jsonl(out / "test.jsonl")
    expected = split_pairs(load_pairs(source, format="icliniq"), 0.2, 1)
    assert (train, test) == expected
    check_disjoint(train, test)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{source}: {len(rows)} pairs, format icliniq"
    for line, name, part in zip(printed[1:], ("train", "test"), (train, test)):
        prompts = len({p.prompt for p in part})
        assert line == f"{name}: {len(part)} pairs, {prompts} prompts -> {out / name}.jsonl"


def test_prepare_data_cli_keeps_subset_and_reports_bad_rows(tmp_path, script, capsys):
    out = tmp_path / "prepared"
    rewardbench = FIXTURES / "rewardbench.json"
    argv = ["--input", str(rewardbench), "--format", "rewardbench", "--out_dir", str(out)]
    argv += ["--test_fraction", "0.5"]
    assert script.main(argv) == 0
    written = load_preference_jsonl(out / "train.jsonl") + load_preference_jsonl(out / "test.jsonl")
    assert sorted(p.subset for p in written) == ["hep-python", "refusals-dangerous"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "chosen": ""}])
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--input", str(bad), "--out_dir", str(tmp_path / "from_bad")])
    assert exit_info.value.code == 2 and f"error: {bad}:2: field 'chosen' is empty" in capsys.readouterr().err


def test_prepare_data_cli_renders_with_a_saved_tokenizer(tmp_path, script, templated_tokenizer):
    templated_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "prepared"
    argv = ["--input", str(FIXTURES / "skywork.jsonl"), "--out_dir", str(out), "--test_fraction", "0.5"]
    assert script.main([*argv, "--tokenizer", str(tmp_path / "tok")]) == 0
    written = load_preference_jsonl(out / "train.jsonl") + load_preference_jsonl(out / "test.jsonl")
    assert sorted(p.prompt for p in written) == sorted(
        p.prompt for p in load_pairs(FIXTURES / "skywork.jsonl", tokenizer=templated_tokenizer)
    )
    assert all(p.prompt.startswith("<user>") and p.prompt.endswith("<assistant>") for p in written)
