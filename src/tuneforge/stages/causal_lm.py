"""Stages whose loss is next-token cross-entropy on trained tokens: pt and sft."""

from __future__ import annotations

import torch
from torch import nn

from tuneforge.data.encode import IGNORE_INDEX
from tuneforge.stages.base import (
    Batch,
    LossOutput,
    Row,
    Stage,
    attention_mask,
    batch_token_logps,
    metric,
    pad,
)
from tuneforge.stages.registry import STAGES


def causal_lm_loss(model: nn.Module, batch: Batch) -> LossOutput:
    """Summed next-token CE over trained positions; token accuracy too when evaluating (no grad)."""
    logps = batch_token_logps(model, batch, uniform_grad=True)
    tokens = torch.tensor(logps.values.shape[0])
    metrics = {"accuracy": metric(logps.hits.sum(), tokens)} if logps.hits is not None else {}
    return LossOutput(-logps.values.sum(), tokens, metrics)


class CausalLMStage(Stage):
    """Shared collation: right padding, or packed rows with position ids restarting at each row."""

    reports_perplexity = True

    def collate(self, rows: list[Row]) -> Batch:
        ids = [r["input_ids"] for r in rows]
        batch = {"input_ids": pad(ids, self.pad_id), "labels": pad([r["labels"] for r in rows], IGNORE_INDEX)}
        if "position_ids" in rows[0]:
            # Packed rows: no attention mask, so transformers builds a block-diagonal causal mask from the
            # position ids; padding continues the numbering as its own segment and is never trained.
            longest = batch["input_ids"].shape[1]
            batch["position_ids"] = torch.stack([
                torch.tensor(r["position_ids"] + list(range(longest - len(r["position_ids"]))), dtype=torch.long)
                for r in rows])
        else:
            batch["attention_mask"] = attention_mask(ids)
        return batch

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Next-token cross-entropy."""
        return causal_lm_loss(model, batch)


@STAGES.register("sft")
class SFTStage(CausalLMStage):
    """Supervised fine-tuning on conversations: responses trained, prompts masked."""

    name = "sft"
    data_kind = "sft"


@STAGES.register("pt")
class PretrainStage(CausalLMStage):
    """Continued pre-training on plain text: every token trained."""

    name = "pt"
    data_kind = "text"
