"""Per-request sampling inside a continuous batch whose manager picks tokens by argmax.

Each processor reads one setting per request (transformers' per-request processor interface: one int32 row of
arguments per processor, float settings carried as their bits) and touches only the rows that asked for it:
temperature, top-k, top-p, then Gumbel noise on sampled rows. The argmax of logits plus independent Gumbel(0, 1)
noise is an exact draw from the softmax of the logits (the Gumbel-max trick), so sampled rows are drawn as
`generate` draws them, while greedy rows (temperature 0) keep their logits untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList

SETTINGS = {"temperature": float, "top_k": int, "top_p": float}


class RowSetting(ContinuousBatchingLogitsProcessor):
    """One per-request number; `neutral` leaves a row alone."""

    key = ""
    neutral: float | int = 0

    def __init__(self) -> None:
        self.supported_kwargs = {self.key: SETTINGS[self.key]}
        self.ignored_kwargs = ()

    def encode(self, values: list[Any]) -> torch.Tensor:
        if SETTINGS[self.key] is int:
            return torch.tensor(values, dtype=torch.int32)
        return torch.tensor(values, dtype=torch.float32).view(torch.int32)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.copy_(self.encode([self.neutral] * int32_tensor.numel()).view_as(int32_tensor))

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        return self.encode([r.state.logit_processor_kwargs.get(self.key, self.neutral)
                            for r in requests_with_new_token])

    def values(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        """This processor's setting for each row of `scores`."""
        rows = tensor_arg[: scores.size(0)]
        return rows if SETTINGS[self.key] is int else rows.view(torch.float32)


class Temperature(RowSetting):
    key, neutral = "temperature", 0.0

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        temperature = self.values(scores, tensor_arg)
        sampled = temperature > 0
        if not bool(sampled.any()):
            return scores
        return scores / torch.where(sampled, temperature, torch.ones_like(temperature)).unsqueeze(-1)


class TopK(RowSetting):
    key, neutral = "top_k", 0

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        top_k = self.values(scores, tensor_arg)
        rows = (top_k > 0).nonzero().flatten()
        if rows.numel() == 0:
            return scores
        k = top_k[rows].long().clamp(max=scores.size(-1))
        part = scores[rows]
        kth = part.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(-1))  # each row's k-th largest
        scores = scores.clone()
        scores[rows] = part.masked_fill(part < kth, float("-inf"))
        return scores


class TopP(RowSetting):
    key, neutral = "top_p", 1.0

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        top_p = self.values(scores, tensor_arg)
        rows = (top_p < 1.0).nonzero().flatten()
        if rows.numel() == 0:
            return scores
        part = scores[rows]
        ordered, order = part.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        above = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each token
        drop_sorted = above >= top_p[rows].unsqueeze(-1)  # keep the smallest top set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scores = scores.clone()
        scores[rows] = part.masked_fill(drop, float("-inf"))
        return scores


class GumbelDraw(RowSetting):
    key, neutral = "temperature", 0.0

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows = (self.values(scores, tensor_arg) > 0).nonzero().flatten()
        if rows.numel() == 0:
            return scores
        uniform = torch.rand(rows.numel(), scores.size(-1), device=scores.device).clamp_(min=1e-20)
        scores = scores.clone()
        scores[rows] = scores[rows] - torch.log(-torch.log(uniform))
        return scores


def sampling_processors() -> ContinuousBatchingLogitsProcessorList:
    """The chain for a Batcher's manager: temperature, top-k, top-p, Gumbel noise."""
    processors = [Temperature(), TopK(), TopP(), GumbelDraw()]
    chain = ContinuousBatchingLogitsProcessorList(LogitsProcessorList(processors))
    chain.tensors_required = len(processors)  # one argument row each (transformers counts only those it converts)
    return chain
