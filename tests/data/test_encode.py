"""Encoding over plain ids: masks, truncation, drop, mask_history, pairwise, packing."""

from __future__ import annotations

import pytest

from tuneforge.data.encode import (
    IGNORE_INDEX as X,
)
from tuneforge.data.encode import (
    EncodeOptions,
    encode_pairwise,
    encode_supervised,
    encode_text,
    infer_seqlen,
    pack_blocks,
)


@pytest.mark.parametrize(("source", "target", "cutoff", "expected"), [
    (10, 5, 100, (10, 5)),    # fits
    (100, 10, 50, (40, 10)),  # short response kept whole, prompt cut
    (10, 100, 50, (10, 40)),  # short prompt kept whole, response cut
    (60, 40, 50, (30, 20)),   # both long: cut in proportion 60:40 -> response int(50 * 0.4) = 20
])
def test_infer_seqlen_hand_computed(source, target, cutoff, expected):
    assert infer_seqlen(source, target, cutoff) == expected


PAIRS = [([1, 2], [3, 4]), ([5], [6, 7])]


def test_multi_turn_trains_every_response():
    row = encode_supervised(PAIRS, EncodeOptions(cutoff_len=100))
    assert row == {"input_ids": [1, 2, 3, 4, 5, 6, 7], "labels": [X, X, 3, 4, X, 6, 7], "status": "ok"}


def test_train_on_prompt_trains_everything():
    row = encode_supervised(PAIRS, EncodeOptions(cutoff_len=100, train_on_prompt=True))
    assert row["labels"] == [1, 2, 3, 4, 5, 6, 7]


def test_mask_history_trains_only_the_last_turn():
    row = encode_supervised(PAIRS, EncodeOptions(cutoff_len=100, mask_history=True))
    assert row["input_ids"] == [1, 2, 3, 4, 5, 6, 7]
    assert row["labels"] == [X, X, X, X, X, 6, 7]


def test_truncation_keeps_the_response_and_reports_it():
    row = encode_supervised([(list(range(10, 30)), [1, 2, 3])], EncodeOptions(cutoff_len=10))
    assert row["status"] == "truncated"
    assert row["input_ids"] == list(range(10, 17)) + [1, 2, 3]
    assert row["labels"] == [X] * 7 + [1, 2, 3]


def test_drop_mode_drops_overlong_rows():
    assert encode_supervised([([1] * 20, [2])], EncodeOptions(cutoff_len=10, overlong="drop"))["status"] == "dropped"


def test_second_turn_beyond_cutoff_is_cut_off():
    row = encode_supervised([([1, 2], [3, 4]), ([5, 6], [7, 8])], EncodeOptions(cutoff_len=4))
    assert row["input_ids"] == [1, 2, 3, 4] and row["status"] == "truncated"


def test_pairwise_shares_the_prompt_and_masks_it():
    row = encode_pairwise([1, 2, 3], [4, 5], [6], EncodeOptions(cutoff_len=100))
    assert row["chosen_input_ids"] == [1, 2, 3, 4, 5] and row["chosen_labels"] == [X, X, X, 4, 5]
    assert row["rejected_input_ids"] == [1, 2, 3, 6] and row["rejected_labels"] == [X, X, X, 6]


def test_text_rows_append_eos_and_train_everything():
    assert encode_text([5, 6], 2, 10) == {"input_ids": [5, 6, 2], "labels": [5, 6, 2], "status": "ok"}
    assert encode_text([5, 6, 7], 2, 3)["status"] == "truncated"


def test_pack_blocks_concatenates_and_chunks_without_losing_tokens():
    assert pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4) == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]


def test_a_cut_prompt_keeps_its_start_and_the_assistant_header():
    from tuneforge.data.encode import EncodeOptions, encode_pairwise

    # prompt: 10 tokens of system/history (1..10) + a final turn with its header (101, 102, 103); answers 6 tokens
    prompt = list(range(1, 11)) + [101, 102, 103]
    row = encode_pairwise(prompt, [7] * 6, [8] * 4, EncodeOptions(cutoff_len=14), tail=3)
    # infer_seqlen(13, 6, 14): 2*6 < 14 -> the answer is kept whole, the prompt gets 8 tokens:
    # its first 5 and its last 3 (the header next to the answer), never the head alone as LLaMA-Factory does
    assert row["chosen_input_ids"] == [1, 2, 3, 4, 5, 101, 102, 103] + [7] * 6
    assert row["rejected_input_ids"] == [1, 2, 3, 4, 5, 101, 102, 103] + [8] * 4
    assert row["chosen_labels"] == [-100] * 8 + [7] * 6 and row["status"] == "truncated"
