"""The Stage contract: what a stage encodes, how it batches, what it sets up and what loss a batch gives.

The loop knows nothing else. A stage is built from the run config (its own section), owns its row schema
(columns, row length for batching, the units its loss is averaged over), may set up extra models once the policy
exists (reference, value head), and returns a summed loss plus metrics as [sum, count] pairs that the loop
reduces across the accumulation window and all processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from tuneforge.data.encode import IGNORE_INDEX
from tuneforge.train.losses import TokenLogps, token_logps

DataKind = Literal["text", "sft", "pairwise", "kto", "prompt"]
Row = dict[str, Any]
Batch = dict[str, Tensor]


def metric(total: Tensor | float, count: Tensor | float) -> Tensor:
    """A metric as a [sum, count] pair (fp64, detached): the loop adds pairs, then reports sum / count."""
    return torch.stack([torch.as_tensor(total, dtype=torch.float64).detach().reshape(()).cpu(),
                        torch.as_tensor(count, dtype=torch.float64).detach().reshape(()).cpu()])


@dataclass
class LossOutput:
    """A micro-batch's summed loss, the units it sums over (tokens, pairs, rows) and its metrics."""

    loss_sum: Tensor
    units: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)  # name -> metric(sum, count)


class Stage(ABC):
    """A training stage. Subclasses set name, data_kind and columns, and implement collate and loss."""

    name: ClassVar[str]
    data_kind: ClassVar[DataKind]
    columns: ClassVar[tuple[str, ...]] = ("input_ids", "labels")
    reports_perplexity: ClassVar[bool] = False  # eval loss is a token cross-entropy (pt, sft)
    progress_metrics: ClassVar[dict[str, str]] = {}  # metric -> short label for the progress bar
    run_dir: Path | None = None  # the folder of the run being trained (set by the loop), for the stage's own files

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    @classmethod
    def from_config(cls, cfg: Any, pad_id: int) -> Stage:
        """Build the stage from the run config (stages with settings read their own section)."""
        return cls(pad_id)

    def setup(self, model: nn.Module, acc: Any) -> nn.Module:
        """Attach what the stage needs once the policy exists (reference, value head); returns the model to train."""
        return model

    def row_length(self, row: Row) -> int:
        """Tokens a row puts through the model (length grouping and forward-pass budgets)."""
        return len(row["input_ids"])

    def units(self, rows: list[Row]) -> int:
        """What the loss of these rows sums over; the loop divides by the window's total (default: trained tokens)."""
        return sum(sum(1 for t in row["labels"][1:] if t != IGNORE_INDEX) for row in rows)

    def describe(self) -> str:
        """One line for the plan (settings, and the reference in use where there is one)."""
        return self.name

    def check_rows(self, rows: list[Row]) -> None:
        """Look at the training rows once before training (e.g. warn about class balance)."""
        return None

    def summarize(self, values: dict[str, float]) -> dict[str, float]:
        """Add metrics derived from the reduced ones (e.g. margins); called on each logged record."""
        return values

    def reference_model(self) -> nn.Module | None:
        """A separately loaded reference model (counted in the plan's memory), if the stage holds one."""
        reference = getattr(self, "reference", None)
        return reference.model if reference is not None else None

    def reward_model(self) -> nn.Module | None:
        """A separately loaded reward model (counted in the plan's memory), if the stage holds one."""
        return None

    def precompute_reference(self, rows: list[list[Row]], model: nn.Module, batch_size: int, cache: Any) -> None:
        """Compute reference log-probs once (stages with a reference implement this)."""
        from tuneforge.errors import ConfigError

        raise ConfigError(f"reference.precompute is not available for stage {self.name}")

    def prepare_step(self, model: nn.Module, parts: list[list[Row]], acc: Any) -> list[list[Row]] | None:
        """Called with all of a step's forward passes before any of them (e.g. KTO's KL estimate over the window);
        online stages return the rows to train on instead (micro-batches, cut into forward passes by the loop)."""
        return None

    def eval_step(self, model: nn.Module, rows: list[Row], acc: Any, index: int) -> \
            tuple[list[Row], dict[str, Tensor]] | None:
        """Online stages: the rows to evaluate for these validation prompts (generated, the same sample at every
        evaluation: seeded by `index`, the batch's position) and the rollout's metrics; None: evaluate `rows`."""
        return None

    @abstractmethod
    def collate(self, rows: list[Row]) -> Batch:
        """Pad a list of encoded rows into one batch of tensors."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Summed loss over this batch's units, and metrics."""

    def state_dict(self) -> dict[str, Any]:
        """Running state saved in checkpoints (e.g. running means); plain numbers only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""
        return None


def pad(seqs: list[list[int]], value: int) -> Tensor:
    """Right-pad integer lists into a [batch, longest] tensor."""
    longest = max(len(s) for s in seqs)
    out = torch.full((len(seqs), longest), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def attention_mask(seqs: list[list[int]]) -> Tensor:
    """1 for real tokens, 0 for right padding, [batch, longest]."""
    lengths = torch.tensor([len(s) for s in seqs])
    return (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside DDP / value-head / peft wrappers (adapter layers stay injected)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "pretrained_model") and isinstance(model.pretrained_model, nn.Module):  # value head
            model = model.pretrained_model
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            return model


def uses_fused_head(lm: nn.Module) -> bool:
    """Plain linear output heads (Llama, Qwen, Mistral, ...) get the fused chunked log-probs."""
    config = lm.config
    special = any(getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    head = lm.get_output_embeddings()
    return not special and isinstance(head, nn.Linear) and head.bias is None


def model_mask(batch: Batch) -> Tensor | None:
    """The attention mask a training forward hands the model: none when every row is only right-padded.

    Causal attention never looks right, so a real token sees exactly what the padding mask would let it see; the
    padded positions' outputs change but are never read (no trained label, never a row's last real token). The
    attention kernel then runs causal with grouped KV heads, without a materialised [b, 1, t, t] mask or copies
    of the KV heads."""
    mask = batch.get("attention_mask")
    if mask is None or "position_ids" in batch:
        # packed rows that attend to each other: without a mask, transformers would take the position ids that
        # restart at every row for neat packing and build a block-diagonal mask
        return mask
    right_padded = torch.arange(mask.shape[1], device=mask.device)[None, :] < mask.sum(-1, keepdim=True)
    return None if torch.equal(mask.bool(), right_padded) else mask


def decoder_hidden(lm: nn.Module, batch: Batch) -> Tensor:
    """Last hidden states [b, t, h] of the decoder (no output head)."""
    return lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=model_mask(batch),
                            position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state


def batch_token_logps(model: nn.Module, batch: Batch, uniform_grad: bool = False) -> TokenLogps:
    """log p of every trained next token (labels != -100) in the batch, without [tokens, vocab] logits for backward."""
    lm = unwrap_causal_lm(model)
    labels = batch["labels"][:, 1:]  # [b, t-1]; position i predicts token i+1
    keep = labels != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[keep]
    if uses_fused_head(lm):
        hidden = decoder_hidden(lm, batch)[:, :-1][keep]  # [n, h]
        values, hits = token_logps(hidden, lm.get_output_embeddings().weight, labels[keep], uniform_grad)
        return TokenLogps(values, rows, labels.shape[0], hits)
    # heads with soft-capping or scaling: the model's own logits
    logits = lm(input_ids=batch["input_ids"], attention_mask=model_mask(batch),
                position_ids=batch.get("position_ids"), use_cache=False).logits[:, :-1][keep].float()
    values = logits.log_softmax(-1).gather(1, labels[keep][:, None]).squeeze(1)
    hits = None if torch.is_grad_enabled() else logits.argmax(-1) == labels[keep]
    return TokenLogps(values, rows, labels.shape[0], hits)
