"""JSONL preference loader, prompt/response encoding and prompt+generation joining."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from gem_fast.data import (
    Completion,
    PreferencePair,
    encode_pairs,
    encode_prompt_responses,
    encode_prompts,
    join_prompt_and_generation,
    load_completions,
    load_preference_jsonl,
)

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


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_encode_marks_exactly_the_response_tokens(tok, padding_side):
    batch = encode_prompt_responses(tok, ["ab", "x"], ["c", "yz"], padding_side=padding_side)
    row0 = ids(tok, "abc") + [EOS]
    row1 = ids(tok, "xyz") + [EOS]
    assert batch.input_ids.shape == (2, 4)
    assert batch.input_ids.tolist() == [row0, row1]
    assert batch.response_mask.tolist() == [[False, False, True, True], [False, True, True, True]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]

    uneven = encode_prompt_responses(tok, ["ab", "x"], ["c", "y"], padding_side=padding_side)
    pad = tok.pad_token_id
    if padding_side == "right":
        assert uneven.input_ids[1].tolist() == ids(tok, "xy") + [EOS, pad]
        assert uneven.attention_mask[1].tolist() == [1, 1, 1, 0]
        assert uneven.response_mask[1].tolist() == [False, True, True, False]
    else:
        assert uneven.input_ids[1].tolist() == [pad] + ids(tok, "xy") + [EOS]
        assert uneven.attention_mask[1].tolist() == [0, 1, 1, 1]
        assert uneven.response_mask[1].tolist() == [False, False, True, True]


def test_encode_truncates_prompt_from_the_left_then_response_from_the_right(tok):
    batch = encode_prompt_responses(tok, ["abcdef"], ["xy"], max_length=5)
    assert batch.input_ids[0].tolist() == ids(tok, "efxy") + [EOS]
    assert batch.response_mask[0].tolist() == [False, False, True, True, True]
    # A response that alone fills max_length keeps one prompt token in front of it.
    long = encode_prompt_responses(tok, ["abc"], ["uvwxyz"], max_length=4, append_eos=False)
    assert long.input_ids[0].tolist() == ids(tok, "cuvw")


def test_encode_pairs_puts_chosen_rows_first(tok):
    batch = encode_pairs(tok, [PreferencePair("p", "c1", "r1"), PreferencePair("q", "c2", "r2")])
    decoded = [tok.decode(row[mask].tolist()) for row, mask in zip(batch.input_ids, batch.response_mask)]
    assert decoded == ["c1<eos>", "c2<eos>", "r1<eos>", "r2<eos>"]


def test_encode_rejects_bad_arguments(tok):
    with pytest.raises(ValueError, match="prompts and responses"):
        encode_prompt_responses(tok, ["a"], ["b", "c"])
    with pytest.raises(ValueError, match="padding_side"):
        encode_prompt_responses(tok, ["a"], ["b"], padding_side="middle")
    with pytest.raises(ValueError, match="max_length"):
        encode_prompt_responses(tok, ["a"], ["b"], max_length=1)


def test_join_prompt_and_generation_is_prompt_major():
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])  # row 0 left-padded
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    sequences = torch.tensor([[10, 2], [11, 12], [13, 2], [14, 0]])
    generation_mask = torch.tensor([[True, True], [True, True], [True, True], [True, False]])
    batch = join_prompt_and_generation(prompt_ids, prompt_mask, sequences, generation_mask)
    assert batch.input_ids.tolist() == [
        [0, 5, 6, 10, 2],
        [0, 5, 6, 11, 12],
        [7, 8, 9, 13, 2],
        [7, 8, 9, 14, 0],
    ]
    assert batch.attention_mask[3].tolist() == [1, 1, 1, 1, 0]
    assert batch.attention_mask[0].tolist() == [0, 1, 1, 1, 1]
    assert batch.response_mask[3].tolist() == [False, False, False, True, False]
    with pytest.raises(ValueError, match="multiple of B"):
        join_prompt_and_generation(prompt_ids, prompt_mask, sequences[:3], generation_mask[:3])


def test_encode_prompts_left_pads_and_keeps_the_prompt_end(tok):
    ids, mask = encode_prompts(tok, ["abc", "defgh"], max_length=4)
    # Without a chat template each prompt encodes to one token per character (no BOS added).
    assert mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert tok.decode(ids[0, 1:]) == "abc" and tok.decode(ids[1]) == "efgh"
    assert ids[0, 0].item() == tok.pad_token_id


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


def test_chat_rows_need_a_chat_template(tok):
    with pytest.raises(ValueError, match="chat rows"):
        encode_prompt_responses(tok, [[{"role": "user", "content": "q"}]], ["a"])
