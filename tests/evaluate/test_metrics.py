"""BLEU-4 and ROUGE against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from tuneforge.evaluate.metrics import bleu4, lcs, repeats_itself, rouge_l, rouge_n, words


def test_english_scores_by_hand():
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    # unigrams: 5 of 6 match both ways -> F1 5/6; bigrams: the cat, on the, the mat = 3 of 5 -> 0.6
    assert rouge_n(hyp, ref, 1) == pytest.approx(100 * 5 / 6)
    assert rouge_n(hyp, ref, 2) == pytest.approx(60.0)
    # LCS "the cat on the mat" = 5 words -> 5/6
    assert rouge_l(hyp, ref) == pytest.approx(100 * 5 / 6)
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0 -> smoothed (method3) to 1 / (2 * 3); equal lengths, no penalty
    expected = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(1 / 6)) / 4)
    assert bleu4(hyp, ref) == pytest.approx(expected)


def test_chinese_is_segmented_with_jieba_and_scored_by_hand():
    hyp, ref = "我是人工智能助手", "我是一个人工智能助手"
    assert words(ref) == ["我", "是", "一个", "人工智能", "助手"]
    # 4 of 4 hypothesis words in the 5 reference words: P = 1, R = 4/5 -> F1 = 8/9
    assert rouge_n(hyp, ref, 1) == pytest.approx(100 * 8 / 9)
    # bigrams: 我是, 人工智能助手 shared; P = 2/3, R = 2/4 -> F1 = 4/7
    assert rouge_n(hyp, ref, 2) == pytest.approx(100 * 4 / 7)
    assert rouge_l(hyp, ref) == pytest.approx(100 * 8 / 9)


def test_edge_cases():
    assert bleu4("", "something") == 0.0 and rouge_l("", "x") == 0.0
    assert lcs(list("abcde"), list("ace")) == 3
    assert repeats_itself("go go go go " * 3) and not repeats_itself("a b c d e f g h")
