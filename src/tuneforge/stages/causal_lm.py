"""Stages whose loss is next-token cross-entropy on trained tokens: pt and sft."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tuneforge.data.encode import IGNORE_INDEX
from tuneforge.stages.base import LossOutput, Stage, pad
from tuneforge.stages.registry import STAGES
from tuneforge.train.losses import linear_cross_entropy


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside DDP / peft wrappers (adapter layers stay injected)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            return model


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
    """Summed next-token CE over positions whose label is trained; logits only where needed."""
    lm = unwrap_causal_lm(model)
    labels = batch["labels"][:, 1:]  # [b, t-1]; position i predicts token i+1
    keep = labels != IGNORE_INDEX
    metrics: dict[str, float] = {}
    if uses_fused_head(lm):
        hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                  position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
        selected = hidden[:, :-1][keep]  # [n, h]
        weight = lm.get_output_embeddings().weight
        loss_sum = linear_cross_entropy(selected, weight, labels[keep])
        if not torch.is_grad_enabled():  # evaluation: also count exact next-token hits, chunk by chunk
            metrics["correct"] = float(sum(
                ((selected[i:i + 1024] @ weight.T.to(selected.dtype)).argmax(-1) == labels[keep][i:i + 1024]).sum()
                for i in range(0, selected.shape[0], 1024)))
    else:  # heads with soft-capping or scaling: take the model's own logits
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    position_ids=batch.get("position_ids"), use_cache=False).logits[:, :-1]
        loss_sum = nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
        metrics["correct"] = float((logits[keep].argmax(-1) == labels[keep]).sum())
    return LossOutput(loss_sum, keep.sum(), metrics)


def uses_fused_head(lm: nn.Module) -> bool:
    """Plain linear output heads (Llama, Qwen, Mistral, ...) get the fused chunked loss."""
    config = lm.config
    special = any(getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    head = lm.get_output_embeddings()
    return not special and isinstance(head, nn.Linear) and head.bias is None


class CausalLMStage(Stage):
    """Shared collation: right padding, or packed rows with position ids restarting at each row."""

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = {"input_ids": pad([r["input_ids"] for r in rows], self.pad_id),
                 "labels": pad([r["labels"] for r in rows], IGNORE_INDEX)}
        if "position_ids" in rows[0]:
            # Packed rows: no attention mask, so transformers builds a block-diagonal causal mask from the
            # position ids; padding continues the numbering as its own segment and is never trained.
            longest = batch["input_ids"].shape[1]
            batch["position_ids"] = torch.stack([
                torch.tensor(r["position_ids"] + list(range(longest - len(r["position_ids"]))), dtype=torch.long)
                for r in rows])
        else:
            lengths = torch.tensor([len(r["input_ids"]) for r in rows])
            batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1])[None, :] < lengths[:, None]).long()
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
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
