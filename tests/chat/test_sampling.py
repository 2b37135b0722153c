"""Per-request sampling in the continuous batch: each processor touches only the rows that asked for it, and
argmax over Gumbel-noised logits draws from the softmax (checked by frequency against the exact probabilities)."""

from __future__ import annotations

import math

import torch
from transformers.generation.logits_process import TopPLogitsWarper

from tuneforge.chat.sampling import GumbelDraw, Temperature, TopK, TopP


def args(processor, values):
    return processor.encode(values)


def test_greedy_rows_are_left_untouched():
    scores = torch.randn(3, 50)
    for processor, neutral in ((Temperature(), 0.0), (TopK(), 0), (TopP(), 1.0), (GumbelDraw(), 0.0)):
        assert torch.equal(processor(scores, args(processor, [neutral] * 3)), scores)


def test_temperature_then_gumbel_draws_from_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    draws = 40_000
    temperature = 0.7
    scores = logits.repeat(draws, 1)
    scaled = Temperature()(scores, args(Temperature(), [temperature] * draws))
    picked = GumbelDraw()(scaled, args(GumbelDraw(), [temperature] * draws)).argmax(-1)
    frequencies = torch.bincount(picked, minlength=4).float() / draws
    exact = [math.exp(v / temperature) for v in logits.tolist()]
    exact = [e / sum(exact) for e in exact]
    for seen, want in zip(frequencies.tolist(), exact):
        assert abs(seen - want) < 0.01, (frequencies, exact)


def test_top_k_and_top_p_filter_only_their_rows():
    torch.manual_seed(1)
    scores = torch.randn(4, 30)
    filtered = TopK()(scores, args(TopK(), [2, 0, 5, 0]))
    assert [int(torch.isfinite(row).sum()) for row in filtered] == [2, 30, 5, 30]
    assert torch.equal(filtered[1], scores[1])
    assert set(filtered[0].topk(2).indices.tolist()) == set(scores[0].topk(2).indices.tolist())
    top_p = [0.5, 1.0, 0.9, 0.2]
    kept = TopP()(scores, args(TopP(), top_p))
    for row, p in enumerate(top_p):  # transformers' own warper is the reference
        reference = TopPLogitsWarper(top_p=p)(None, scores[row:row + 1]) if p < 1 else scores[row:row + 1]
        assert torch.equal(torch.isfinite(kept[row]), torch.isfinite(reference[0])), row
