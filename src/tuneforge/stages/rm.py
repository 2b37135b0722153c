"""Stage rm: a pairwise reward model, a scalar value head on the last token of each sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.models.hub import resolve_model_dir
from tuneforge.models.valuehead import ValueHead, WithValueHead, find_value_head, hidden_size, load_value_head
from tuneforge.stages.base import Batch, LossOutput, decoder_hidden, metric, unwrap_causal_lm
from tuneforge.stages.dpo import PairStage
from tuneforge.stages.registry import STAGES


def last_token_scores(model: WithValueHead, batch: Batch) -> torch.Tensor:
    """Value-head score of each right-padded sequence's last real token, [rows] fp32."""
    hidden = decoder_hidden(unwrap_causal_lm(model), batch)  # [rows, t, h]
    last = batch["attention_mask"].sum(-1) - 1  # [rows]
    return model.v_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


@STAGES.register("rm")
class RewardStage(PairStage):
    """loss = -logsigmoid(s_chosen - s_rejected) per pair; accuracy = share of pairs with s_chosen > s_rejected."""

    name = "rm"
    progress_metrics = {"accuracy": "acc"}

    def __init__(self, pad_id: int, run: RunConfig | None = None) -> None:
        super().__init__(pad_id)
        self.run = run or RunConfig()

    @classmethod
    def from_config(cls, cfg: RunConfig, pad_id: int) -> RewardStage:
        return cls(pad_id, cfg)

    def setup(self, model: nn.Module, acc: Any) -> nn.Module:
        """Wrap the model with a value head: new, or loaded from the adapter (or model) training continues from."""
        head = ValueHead(hidden_size(model), self.run.rm.head_dropout)
        source = Path(self.run.model.adapter_path[-1]) if self.run.model.adapter_path else \
            resolve_model_dir(self.run.model)
        found = find_value_head(source) or find_value_head(source / "adapter")  # an adapter, or a run folder
        if found:
            load_value_head(found, head)
        self.head_source = str(found) if found else None
        return WithValueHead(model, head)

    def describe(self) -> str:
        return f"rm; value head {'loaded from ' + self.head_source if self.head_source else 'new'}"

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Pairwise logistic loss on last-token scores."""
        scores = last_token_scores(model, batch)
        chosen, rejected = scores.chunk(2)
        n = chosen.shape[0]
        losses = -F.logsigmoid(chosen - rejected)
        metrics = {"accuracy": metric((chosen > rejected).sum(), n),
                   "scores/chosen": metric(chosen.detach().sum(), n),
                   "scores/rejected": metric(rejected.detach().sum(), n)}
        return LossOutput(losses.sum(), torch.tensor(n), metrics)
