"""Stage kto: Kahneman-Tversky optimisation on answers labelled desirable or undesirable.

The KL reference point is estimated from mismatched pairs built inside each optimizer step: row i's prompt with
row i-1's answer, over the whole accumulation window of a process, averaged over all processes (TRL's rule that
mismatched answers come from the same batch; LLaMA-Factory fixes them at preprocessing time instead).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from tuneforge.config.schema import KTOConfig, RunConfig
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
from tuneforge.stages.pref_losses import kto_loss
from tuneforge.stages.reference import Reference, build_reference, disable_dropout
from tuneforge.stages.registry import STAGES

log = logging.getLogger(__name__)
BALANCE = (2 / 3, 3 / 2)  # warn outside this weighted desirable/undesirable ratio (TRL recommends [1, 4/3])


def prompt_length(labels: list[int]) -> int:
    """Tokens before the first trained one."""
    return next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


def mismatched(rows: list[Row], cutoff: int) -> list[Row]:
    """Row i's prompt with row i-1's answer (cyclically), cut to cutoff tokens; for the KL estimate."""
    out = []
    for i, row in enumerate(rows):
        other = rows[i - 1]
        start, other_start = prompt_length(row["labels"]), prompt_length(other["labels"])
        answer = list(other["input_ids"][other_start:])
        ids = (list(row["input_ids"][:start]) + answer)[:cutoff]
        labels = ([IGNORE_INDEX] * start + answer)[:cutoff]
        out.append({"input_ids": ids, "labels": labels, "kto_label": row["kto_label"]})
    return out


@STAGES.register("kto")
class KTOStage(Stage):
    """Per-row loss w (1 - sigmoid(beta (reward - KL))) with the sign set by the row's label; averaged over rows."""

    name = "kto"
    data_kind = "kto"
    columns = ("input_ids", "labels", "kto_label")
    progress_metrics = {"rewards/margins": "margin", "kl": "kl"}

    def __init__(self, pad_id: int, settings: KTOConfig | None = None, run: RunConfig | None = None) -> None:
        super().__init__(pad_id)
        self.settings = settings or KTOConfig()
        self.run = run or RunConfig()
        self.reference: Reference | None = None
        self.kl = torch.zeros(())  # the current step's KL estimate (detached)
        self.window_rows, self.window_desirable = 1, 1  # global counts of the current step, for the SFT term

    @classmethod
    def from_config(cls, cfg: RunConfig, pad_id: int) -> KTOStage:
        return cls(pad_id, cfg.kto, cfg)

    def setup(self, model: nn.Module, acc: Any) -> nn.Module:
        """Dropout off; the reference built once."""
        disable_dropout(model)
        self.reference = build_reference(self.run, model, acc.device)
        return model

    def describe(self) -> str:
        """One line for the plan."""
        s = self.settings
        return (f"kto beta {s.beta:g}, weights desirable {s.chosen_weight:g} / undesirable {s.rejected_weight:g}; "
                f"reference: {self.reference.description if self.reference else 'not set up'}")

    def check_rows(self, rows: list[Row]) -> None:
        """Warn when one class is missing or the weighted class balance is far from 1."""
        good = sum(1 for r in rows if r["kto_label"])
        bad = len(rows) - good
        if not good or not bad:
            log.warning("kto: every row is %s; KTO needs both desirable and undesirable answers",
                        "desirable" if good else "undesirable")
            return
        ratio = self.settings.chosen_weight * good / (self.settings.rejected_weight * bad)
        if not BALANCE[0] <= ratio <= BALANCE[1]:
            log.warning("kto: weighted class balance chosen_weight*%d / (rejected_weight*%d) = %.2f; aim for 1 to "
                        "4/3 by setting kto.chosen_weight / kto.rejected_weight (LLaMA-Factory: kto_chosen_weight, "
                        "kto_rejected_weight)", good, bad, ratio)

    def collate(self, rows: list[Row]) -> Batch:
        ids = [r["input_ids"] for r in rows]
        return {"input_ids": pad(ids, self.pad_id), "labels": pad([r["labels"] for r in rows], IGNORE_INDEX),
                "attention_mask": attention_mask(ids),
                "desirable": torch.tensor([bool(r["kto_label"]) for r in rows])}

    def units(self, rows: list[Row]) -> int:
        """Rows."""
        return len(rows)

    def prepare_step(self, model: nn.Module, parts: list[list[Row]], acc: Any) -> None:
        """KL = clamp(mean over the window and all processes of (policy - reference) on mismatched pairs, 0)."""
        rows = [r for part in parts for r in part]
        kl_sum = self.mismatched_kl_sum(model, rows, [len(p) for p in parts])
        totals = torch.tensor([kl_sum, len(rows), sum(1 for r in rows if r["kto_label"])], dtype=torch.float64)
        if acc.num_processes > 1:
            totals = acc.reduce(totals.to(acc.device), reduction="sum").cpu()
        self.kl = (totals[0] / totals[1].clamp(min=1)).clamp(min=0).float()
        self.window_rows, self.window_desirable = int(totals[1]), max(int(totals[2]), 1)

    def mismatched_kl_sum(self, model: nn.Module, rows: list[Row], sizes: list[int]) -> float:
        """Sum over rows of (policy - reference) summed log-probs of the mismatched pairs, in forward-sized parts."""
        kl_rows = mismatched(rows, self.run.data.cutoff_len)
        total, start = 0.0, 0
        with torch.no_grad():
            for size in sizes:
                batch = self.collate(kl_rows[start:start + size])
                batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
                total += float((batch_token_logps(model, batch).sum() - self.reference.logps(model, batch).sum()).sum())
                start += size
        return total

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Summed KTO losses of the rows (+ the SFT term on desirable rows); rewards and KL as metrics."""
        tokens = batch_token_logps(model, batch)
        policy = tokens.sum()  # [b]
        ref = self.reference.logps(model, batch).sum()
        desirable = batch["desirable"]
        if not torch.is_grad_enabled():  # evaluation: the batch's own mismatched pairs give the KL
            rows = [{"input_ids": ids[m.bool()].tolist(), "labels": lab[m.bool()].tolist(), "kto_label": bool(d)}
                    for ids, lab, m, d in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], desirable)]
            self.kl = torch.tensor(max(self.mismatched_kl_sum(model, rows, [len(rows)]) / len(rows), 0.0))
            self.window_rows, self.window_desirable = len(rows), max(int(desirable.sum()), 1)
        s = self.settings
        d = policy - ref
        losses = kto_loss(d, desirable, self.kl.to(d.device), s.beta, s.chosen_weight, s.rejected_weight)
        if s.ftx > 0:  # lambda * mean over the window's desirable rows of the mean log-loss per token
            scale = self.window_rows / self.window_desirable
            losses = losses + s.ftx * scale * desirable * -(policy / tokens.count().clamp(min=1))
        rewards = s.beta * d.detach()
        good, bad = desirable, ~desirable
        n = desirable.shape[0]
        metrics = {"rewards/chosen": metric(rewards[good].sum(), good.sum()),
                   "rewards/rejected": metric(rewards[bad].sum(), bad.sum()),
                   "logps/chosen": metric(policy.detach()[good].sum(), good.sum()),
                   "logps/rejected": metric(policy.detach()[bad].sum(), bad.sum()),
                   "kl": metric(self.kl * n, n)}
        return LossOutput(losses.sum(), torch.tensor(n), metrics)

    def summarize(self, values: dict[str, float]) -> dict[str, float]:
        """Adds rewards/margins = rewards/chosen - rewards/rejected."""
        if "rewards/chosen" in values and "rewards/rejected" in values:
            values["rewards/margins"] = values["rewards/chosen"] - values["rewards/rejected"]
        return values
