"""BLEU-4 and ROUGE-1/2/L F1 over words; Chinese text is segmented with jieba (the way LLaMA-Factory scores it)."""

from __future__ import annotations

import re
from collections import Counter

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def words(text: str) -> list[str]:
    """jieba words for text containing Chinese, whitespace-separated words otherwise."""
    if CJK.search(text):
        import jieba

        jieba.setLogLevel(60)
        return [w for w in jieba.cut(text) if w.strip()]
    return text.split()


def bleu4(prediction: str, reference: str) -> float:
    """Sentence BLEU-4 (nltk, smoothing method3) x 100; 0 for an empty prediction."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hyp, ref = words(prediction), words(reference)
    if not hyp or not ref:
        return 0.0
    return 100 * sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method3)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: int, hyp: int, ref: int) -> float:
    if overlap == 0 or hyp == 0 or ref == 0:
        return 0.0
    precision, recall = overlap / hyp, overlap / ref
    return 2 * precision * recall / (precision + recall)


def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N F1 x 100: overlap of n-gram counts."""
    hyp, ref = _ngrams(words(prediction), n), _ngrams(words(reference), n)
    return 100 * _f1(sum((hyp & ref).values()), sum(hyp.values()), sum(ref.values()))


def lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence."""
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, start=1):
            current = row[j]
            row[j] = previous + 1 if x == y else max(row[j], row[j - 1])
            previous = current
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 x 100 from the longest common subsequence of words."""
    hyp, ref = words(prediction), words(reference)
    return 100 * _f1(lcs(hyp, ref), len(hyp), len(ref))


def score(prediction: str, reference: str) -> dict[str, float]:
    """All four scores of one prediction."""
    return {"bleu-4": bleu4(prediction, reference), "rouge-1": rouge_n(prediction, reference, 1),
            "rouge-2": rouge_n(prediction, reference, 2), "rouge-l": rouge_l(prediction, reference)}


def repeats_itself(text: str, n: int = 4, times: int = 4) -> bool:
    """True when some n-word sequence occurs `times` or more: a repetition loop."""
    counts = _ngrams(words(text), n)
    return bool(counts) and max(counts.values()) >= times
