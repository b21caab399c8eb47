"""Tokenising (gem_fast.data.encoding): prompt/response encoding with response masks, prompts for generation,
prompt+generation joining."""

from __future__ import annotations

import pytest
import torch

from gem_fast.data import (PreferencePair, encode_pairs, encode_prompt_responses, encode_prompts,
                           join_prompt_and_generation)

EOS = 2


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


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


def test_chat_rows_need_a_chat_template(tok):
    with pytest.raises(ValueError, match="chat rows"):
        encode_prompt_responses(tok, [[{"role": "user", "content": "q"}]], ["a"])
