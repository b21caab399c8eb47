"""Eq. 1 entropy score and the final-answer mask helpers, on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from gem_fast.scoring import (
    entropy_score,
    final_mask_from_marker,
    final_mask_last_fraction,
    final_mask_last_n,
    top_m_mask,
)

# Reasoning entropies [1, 3, 2, 0.5], final-answer entropies [0.2, 0.4] (mean 0.3).
H = torch.tensor([1.0, 3.0, 2.0, 0.5, 0.2, 0.4])
FINAL = torch.tensor([False, False, False, False, True, True])


@pytest.mark.parametrize(
    "top_m, fork_mean",
    [
        (0.5, (3 + 2) / 2),  # fraction: ceil(0.5 * 4) = 2 tokens
        (0.1, 3.0),  # fraction: ceil(0.4) = 1, at least 1
        (3, (3 + 2 + 1) / 3),  # count
        (10, (1 + 3 + 2 + 0.5) / 4),  # count above |R|: all reasoning tokens
        (1, 3.0),  # 1 is the count 1, not the fraction 100 %
    ],
)
def test_eq1_by_hand(top_m, fork_mean):
    score = entropy_score(H, FINAL, lambda_fork=0.4, top_m=top_m)
    assert score.dtype == torch.float32
    assert score.item() == pytest.approx(-0.3 + 0.4 * fork_mean, abs=1e-6)


def test_fraction_is_not_fooled_by_float_rounding():
    # 0.1 * 30 = 3.0000000000000004 in floating point; the top-m set must still be 3 tokens.
    entropy = torch.cat([torch.arange(30.0), torch.zeros(1)])
    final = torch.zeros(31, dtype=torch.bool)
    final[-1] = True
    score = entropy_score(entropy, final, lambda_fork=1.0, top_m=0.1)
    assert score.item() == pytest.approx((29 + 28 + 27) / 3)


def test_invalid_tokens_never_count():
    # Post-EOS padding with huge entropy, inside and outside the final span.
    entropy = torch.cat([H, torch.tensor([50.0, 60.0])])
    final = torch.cat([FINAL, torch.tensor([True, False])])
    valid = torch.cat([torch.ones(6, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)])
    expected = entropy_score(H, FINAL, top_m=0.5)
    assert entropy_score(entropy, final, valid, top_m=0.5).item() == pytest.approx(expected.item())


def test_empty_final_span_is_minus_inf_and_empty_reasoning_drops_the_fork_term():
    no_final = entropy_score(H, torch.zeros(6, dtype=torch.bool))
    assert no_final.item() == -math.inf
    all_final = entropy_score(H, torch.ones(6, dtype=torch.bool), lambda_fork=5.0)
    assert all_final.item() == pytest.approx(-H.mean().item())
    valid_none = entropy_score(H, FINAL, torch.zeros(6, dtype=torch.bool))
    assert valid_none.item() == -math.inf


def test_batched_over_groups_matches_rows():
    torch.manual_seed(0)
    entropy = torch.rand(2, 3, 7) * 3
    lengths = torch.tensor([[7, 5, 3], [6, 2, 4]])
    valid = torch.arange(7) < lengths.unsqueeze(-1)
    final = final_mask_last_n(valid, 2)
    batched = entropy_score(entropy, final, valid, lambda_fork=0.7, top_m=0.5)
    assert batched.shape == (2, 3)
    for b in range(2):
        for j in range(3):
            n = int(lengths[b, j])
            row = entropy_score(entropy[b, j, :n], final[b, j, :n], lambda_fork=0.7, top_m=0.5)
            assert batched[b, j].item() == pytest.approx(row.item())


def test_top_m_mask_selects_highest_reasoning_entropies_earliest_on_ties():
    entropy = torch.tensor([2.0, 5.0, 2.0, 9.0, 1.0])
    reasoning = torch.tensor([True, True, True, False, True])
    assert top_m_mask(entropy, reasoning, 2).tolist() == [True, True, False, False, False]
    assert top_m_mask(entropy, reasoning, 0.25).tolist() == [False, True, False, False, False]


def test_last_n_and_last_fraction_with_left_and_right_padding():
    valid = torch.tensor(
        [
            [True, True, True, True, True, False],  # right-padded, length 5
            [False, False, True, True, True, True],  # left-padded, length 4
            [True, False, False, False, False, False],  # length 1
            [False] * 6,  # empty
        ]
    )
    last2 = final_mask_last_n(valid, 2)
    assert last2.int().tolist() == [
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1, 1],
        [1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ]
    # ceil(0.25 * 5) = 2, ceil(0.25 * 4) = 1, at least 1 token, none of an empty row.
    quarter = final_mask_last_fraction(valid, 0.25)
    assert quarter.int().tolist() == [
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
        [1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ]


class PieceTokenizer:
    """Decodes each id to a fixed piece, so a token can straddle the marker (": 4")."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def batch_decode(self, sequences: list[list[int]]) -> list[str]:
        return ["".join(self.pieces[i] for i in seq) for seq in sequences]


PIECES = ["<pad>", "So", " Answer", ":", " 4", "2", "####", " 7", ": 4", " no", "<eos>"]


def marker_rows(*rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    seqs = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return seqs, seqs != 0


def test_marker_span_excludes_marker_tokens_and_includes_a_straddling_token():
    tok = PieceTokenizer(PIECES)
    seqs, valid = marker_rows(
        [1, 2, 3, 4, 5, 10],  # "So Answer: 42<eos>": marker ends after ":"
        [1, 2, 8, 5, 10],  # "So Answer: 42<eos>" with ": 4" one token
        [2, 3, 9, 6, 7, 10],  # "Answer: no#### 7<eos>": the last marker wins
    )
    final = final_mask_from_marker(seqs, valid, tok)
    assert final.int().tolist() == [
        [0, 0, 0, 1, 1, 1],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ]


def test_marker_missing_or_empty_answer_uses_fallback_only_when_asked():
    tok = PieceTokenizer(PIECES)
    seqs, valid = marker_rows([1, 9, 5, 10], [1, 2, 3])  # no marker; marker at the very end
    none = final_mask_from_marker(seqs, valid, tok)
    assert not none.any()
    assert (entropy_score(torch.ones(2, 4), none, valid) == -math.inf).all()
    last_n = final_mask_from_marker(seqs, valid, tok, fallback="last_n", fallback_value=2)
    assert last_n.int().tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    frac = final_mask_from_marker(seqs, valid, tok, markers=["Answer:"], fallback="last_fraction", fallback_value=0.5)
    assert frac.int().tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]


def test_marker_ignores_padding_and_custom_markers():
    tok = PieceTokenizer(PIECES)
    seqs = torch.tensor([[0, 0, 1, 6, 7, 10]])  # left-padded "So#### 7<eos>"
    final = final_mask_from_marker(seqs, seqs != 0, tok, markers=["####"])
    assert final.int().tolist() == [[0, 0, 0, 0, 1, 1]]
    assert not final_mask_from_marker(seqs, seqs != 0, tok, markers=["Answer:"]).any()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(top_m=0), "top_m"),
        (dict(top_m=1.5), "top_m"),
        (dict(lambda_fork=float("nan")), "lambda_fork"),
        (dict(final_mask=torch.ones(5, dtype=torch.bool)), "final_mask"),
        (dict(final_mask=torch.ones(6)), "final_mask"),
        (dict(valid_mask=torch.ones(2, 6, dtype=torch.bool)), "valid_mask"),
    ],
)
def test_entropy_score_rejects_bad_arguments(kwargs, name):
    args = dict(token_entropy=H, final_mask=FINAL) | kwargs
    with pytest.raises(ValueError, match=name):
        entropy_score(**args)


def test_mask_helpers_reject_bad_arguments():
    valid = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="n must"):
        final_mask_last_n(valid, 0)
    with pytest.raises(ValueError, match="fraction"):
        final_mask_last_fraction(valid, 1.5)
    with pytest.raises(ValueError, match="fallback_value"):
        final_mask_from_marker(torch.ones(1, 4, dtype=torch.long), valid, PieceTokenizer(PIECES), fallback="last_n")
    with pytest.raises(ValueError, match="markers"):
        final_mask_from_marker(torch.ones(1, 4, dtype=torch.long), valid, PieceTokenizer(PIECES), markers="Answer:")
