"""gem_fast's own JSONL files read into records (gem_fast.data.records): preference pairs, SFT rows (prompt and
completion, chat messages, preference rows), each bad row named by file and line."""

from __future__ import annotations

import copy
import json
import re

import pytest

from gem_fast.data import Completion, PreferencePair, encode_prompt_responses, load_completions, load_preference_jsonl

EOS = 2


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def write_lines(tmp_path, lines: list[str]):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_loader_reads_pairs_skips_blank_lines_and_keeps_subset_and_answer(tmp_path):
    path = write_lines(
        tmp_path,
        [
            json.dumps({"prompt": "p1", "chosen": "c1", "rejected": "r1"}),
            "",
            json.dumps({"prompt": "p2", "chosen": "c2", "rejected": "r2", "subset": "math", "answer": "4", "extra": 1}),
        ],
    )
    assert load_preference_jsonl(path) == [
        PreferencePair("p1", "c1", "r1", None),
        PreferencePair("p2", "c2", "r2", "math", "4"),
    ]
    assert load_preference_jsonl(path, limit=1) == [PreferencePair("p1", "c1", "r1", None)]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "p", "chosen": "c"', "invalid JSON"),
        ('["p", "c", "r"]', "expected a JSON object"),
        ('{"prompt": "p", "chosen": "c"}', "missing field 'rejected'"),
        ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "field 'chosen' must be a string"),
        ('{"prompt": "p", "chosen": "c", "rejected": "  \\n"}', "field 'rejected' is empty"),
        ('{"prompt": "p", "chosen": "c", "rejected": "r", "subset": 1}', "field 'subset' must be a string"),
        ('{"prompt": "p", "chosen": "c", "rejected": "r", "answer": 4}', "field 'answer' must be a string"),
    ],
)
def test_loader_names_file_and_line_of_a_bad_row(tmp_path, bad_line, message):
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    path = write_lines(tmp_path, [good, "", bad_line])
    with pytest.raises(ValueError, match=f"{path}:3: {message}"):
        load_preference_jsonl(path)


CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}")


def test_sft_reads_completion_chat_and_preference_rows(tmp_path, tok):
    path = write_lines(tmp_path, [
        json.dumps({"prompt": "1+1=", "completion": "2"}),
        json.dumps({"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": "2+2="},
                                 {"role": "assistant", "content": "4"}]}),
        json.dumps({"prompt": "3+3=", "chosen": "6", "rejected": "7"}),
    ])
    plain, chat, pair = load_completions(path)
    assert plain == Completion("1+1=", "2") and pair == Completion("3+3=", "6")
    assert chat.completion == "4" and [m["role"] for m in chat.prompt] == ["system", "user"]
    tok = copy.deepcopy(tok)
    tok.chat_template = CHAT
    batch = encode_prompt_responses(tok, [chat.prompt], [chat.completion])  # chat rows: always templated
    assert batch.input_ids[0].tolist() == ids(tok, "<system>Add.\n<user>2+2=\n<a>4") + [EOS]
    assert batch.input_ids[0][batch.response_mask[0]].tolist() == ids(tok, "4") + [EOS]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "completion": " "}, "field 'completion' is empty"),
    ({"completion": "c"}, "missing field 'prompt'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]},
     "the last message must be the assistant's reply"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "'messages' must be a list of at least two messages"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "messages[0] must be an object"),
    ({"text": "t"}, "expected {prompt, completion}, {messages} or {prompt, chosen, rejected}"),
])
def test_bad_sft_rows_stop_at_their_line(tmp_path, row, message):
    path = write_lines(tmp_path, [json.dumps({"prompt": "p", "completion": "c"}), json.dumps(row)])
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}:2: {message}")):
        load_completions(path)
