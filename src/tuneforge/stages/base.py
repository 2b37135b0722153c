"""The Stage protocol: how rows are collated and what loss a batch gives. The loop knows nothing else."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tuneforge.data.encode import IGNORE_INDEX


@dataclass
class LossOutput:
    """A micro-batch's summed loss over its trained tokens, the token count, and extra metrics."""

    loss_sum: Tensor
    tokens: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Stage(ABC):
    """A training stage: the data kind it encodes, its collation and its loss."""

    name: str
    data_kind: str

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    @abstractmethod
    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Pad a list of encoded rows into one batch of tensors."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        """Summed loss over trained tokens (the loop normalises by tokens of the whole accumulation window)."""

    def trained_tokens(self, rows: list[dict[str, Any]]) -> int:
        """Tokens that count towards the loss in these rows (known before the forward pass)."""
        return sum(sum(1 for t in row["labels"][1:] if t != IGNORE_INDEX) for row in rows)


def pad(seqs: list[list[int]], value: int) -> Tensor:
    """Right-pad integer lists into a [batch, longest] tensor."""
    longest = max(len(s) for s in seqs)
    out = torch.full((len(seqs), longest), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out
