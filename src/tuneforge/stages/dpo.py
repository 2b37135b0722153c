"""Stage dpo: the DPO family (sigmoid, hinge, ipo, kto_pair, orpo, simpo; + cDPO, LD-DPO, BCO mix, SFT term)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.config.rules import NO_REFERENCE_LOSSES
from tuneforge.config.schema import DPOConfig, RunConfig
from tuneforge.data.encode import IGNORE_INDEX
from tuneforge.stages import pref_losses as pl
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
from tuneforge.stages.reference import Reference, build_reference, disable_dropout
from tuneforge.stages.registry import STAGES
from tuneforge.train.losses import TokenLogps

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
MEAN_LOSSES = ("ipo", "orpo", "simpo")  # these compare per-token mean log-probs; the others summed ones
DEFAULT_BETA = {"simpo": 2.0}  # SimPO's recipes use beta 2.0-2.5 (LLaMA-Factory's 0.1 is 20x smaller)
DEFAULT_BETA_OTHERS = 0.1
DEFAULT_SIMPO_GAMMA = 1.0  # gamma / beta = 0.5, SimPO's recommended ratio


def collate_pairs(rows: list[Row], pad_id: int) -> Batch:
    """[2b, t]: every chosen sequence, then every rejected one (one forward for both), right-padded."""
    ids = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
    labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
    batch = {"input_ids": pad(ids, pad_id), "labels": pad(labels, IGNORE_INDEX), "attention_mask": attention_mask(ids)}
    if "ref_chosen" in rows[0]:  # precomputed reference log-probs (summed), [2b]
        batch["ref_logps"] = torch.tensor([r["ref_chosen"] for r in rows] + [r["ref_rejected"] for r in rows],
                                          dtype=torch.float32)
    return batch


class PairStage(Stage):
    """Rows are preference pairs; the loss is averaged over pairs."""

    data_kind = "pairwise"
    columns = PAIR_COLUMNS

    def row_length(self, row: Row) -> int:
        """A pair is two padded sequences in one forward pass."""
        return 2 * max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))

    def units(self, rows: list[Row]) -> int:
        """Pairs."""
        return len(rows)

    def collate(self, rows: list[Row]) -> Batch:
        return collate_pairs(rows, self.pad_id)


@STAGES.register("dpo")
class DPOStage(PairStage):
    """Direct preference optimisation and its variants; see ../shared/STAGES.md §3 for each formula."""

    name = "dpo"
    progress_metrics = {"rewards/accuracies": "acc", "rewards/margins": "margin"}

    def __init__(self, pad_id: int, settings: DPOConfig | None = None, run: RunConfig | None = None) -> None:
        super().__init__(pad_id)
        self.settings = settings or DPOConfig()
        self.run = run or RunConfig()
        self.loss_type = self.settings.loss
        self.beta = self.settings.beta if self.settings.beta is not None else \
            DEFAULT_BETA.get(self.loss_type, DEFAULT_BETA_OTHERS)
        self.gamma = self.settings.simpo_gamma if self.settings.simpo_gamma is not None else DEFAULT_SIMPO_GAMMA
        self.reference: Reference | None = None
        self.bco_mean, self.bco_count = 0.0, 0  # running mean of the rewards (BCO's delta)

    @classmethod
    def from_config(cls, cfg: RunConfig, pad_id: int) -> DPOStage:
        return cls(pad_id, cfg.dpo, cfg)

    @property
    def uses_reference(self) -> bool:
        return self.loss_type not in NO_REFERENCE_LOSSES

    def setup(self, model: nn.Module, acc: Any) -> nn.Module:
        """Dropout off; the reference built once (see stages.reference)."""
        disable_dropout(model)
        if self.uses_reference:
            self.reference = build_reference(self.run, model, acc.device)
            disable_dropout(self.reference.model) if self.reference.model is not None else None
        return model

    def describe(self) -> str:
        """One line for the plan: loss, beta and the reference in use."""
        extra = f", gamma {self.gamma:g}" if self.loss_type == "simpo" else ""
        ref = self.reference.description if self.reference else "none (reference-free loss)"
        return f"dpo loss {self.loss_type}, beta {self.beta:g}{extra}; reference: {ref}"

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Per-pair losses summed; rewards, accuracies, margins and log-probs as metrics."""
        tokens = batch_token_logps(model, batch)
        policy, pair_count = self.pair_logps(tokens, self.settings.ld_alpha)
        ref = self.reference_logps(model, batch, tokens) if self.uses_reference else None
        losses, extra = self.pair_losses(policy, ref)
        if self.settings.ftx > 0:  # SFT term on the chosen answer: mean log-loss per token
            chosen_mean = policy.chosen if self.loss_type in MEAN_LOSSES else policy.chosen / pair_count.chosen
            losses = losses + self.settings.ftx * -chosen_mean
        if ref is None:
            r_c, r_r = self.beta * policy.chosen.detach(), self.beta * policy.rejected.detach()
        else:
            r_c = self.beta * (policy.chosen - ref.chosen).detach()
            r_r = self.beta * (policy.rejected - ref.rejected).detach()
        n = policy.chosen.shape[0]
        metrics = {"rewards/chosen": metric(r_c.sum(), n), "rewards/rejected": metric(r_r.sum(), n),
                   "rewards/accuracies": metric((r_c > r_r).sum(), n), "rewards/margins": metric((r_c - r_r).sum(), n),
                   "logps/chosen": metric(policy.chosen.detach().sum(), n),
                   "logps/rejected": metric(policy.rejected.detach().sum(), n),
                   **{k: metric(v.detach().sum(), n) for k, v in extra.items()}}
        return LossOutput(losses.sum(), torch.tensor(n), metrics)

    def pair_logps(self, tokens: TokenLogps, ld_alpha: float | None = None) -> tuple[pl.PairLogps, pl.PairLogps]:
        """(log-probs per pair, trained tokens per pair): sums, or per-token means for ipo/orpo/simpo."""
        counts = tokens.count()  # [2b]
        half = counts.shape[0] // 2
        weights = None
        if ld_alpha is not None:
            pair_of = torch.arange(counts.shape[0], device=counts.device) % half
            weights = pl.ld_weights(tokens.rows, counts, pair_of, ld_alpha)
        sums = tokens.sum(weights)
        values = sums / counts.clamp(min=1) if self.loss_type in MEAN_LOSSES else sums
        return pl.PairLogps(values[:half], values[half:]), pl.PairLogps(counts[:half], counts[half:])

    def reference_logps(self, model: nn.Module, batch: Batch, tokens: TokenLogps) -> pl.PairLogps:
        """Reference log-probs (never LD-weighted): precomputed sums from the batch, or computed now."""
        if "ref_logps" in batch:
            sums = batch["ref_logps"].float()
            if self.loss_type in MEAN_LOSSES:
                sums = sums / tokens.count().clamp(min=1)
            half = sums.shape[0] // 2
            return pl.PairLogps(sums[:half], sums[half:])
        if self.reference is None:
            raise RuntimeError("the reference was released, but the batch has no precomputed log-probs")
        ref, _ = self.pair_logps(self.reference.logps(model, batch))
        return ref

    def pair_losses(self, policy: pl.PairLogps, ref: pl.PairLogps | None) -> tuple[torch.Tensor, dict]:
        """Per-pair losses [b] of the configured variant, and the variant's extra metrics."""
        kind, beta = self.loss_type, self.beta
        if kind == "orpo":
            sft, odds = pl.orpo_parts(policy)
            return sft + beta * odds, {"sft_loss": sft, "odds_ratio_loss": odds}
        if kind == "simpo":
            return pl.simpo_loss(policy, beta, self.gamma), {}
        assert ref is not None
        losses = {"sigmoid": lambda: pl.sigmoid_loss(policy, ref, beta, self.settings.label_smoothing),
                  "hinge": lambda: pl.hinge_loss(policy, ref, beta),
                  "ipo": lambda: pl.ipo_loss(policy, ref, beta),
                  "kto_pair": lambda: pl.kto_pair_loss(policy, ref, beta)}[kind]()
        w = self.settings.bco_weight
        if w > 0:
            delta = self.update_bco_mean(beta * torch.cat([policy.chosen - ref.chosen, policy.rejected - ref.rejected]))
            losses = (losses + w * pl.bco_loss(policy, ref, beta, delta)) / (1 + w)
        return losses, {}

    def update_bco_mean(self, rewards: torch.Tensor) -> float:
        """Running mean of all rewards seen in training (BCO's delta); evaluation reads it without updating."""
        if torch.is_grad_enabled():
            n = rewards.numel()
            self.bco_mean = (self.bco_mean * self.bco_count + float(rewards.detach().sum())) / (self.bco_count + n)
            self.bco_count += n
        return self.bco_mean

    def state_dict(self) -> dict[str, Any]:
        return {"bco_mean": self.bco_mean, "bco_count": self.bco_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bco_mean, self.bco_count = float(state.get("bco_mean", 0.0)), int(state.get("bco_count", 0))

    def precompute_reference(self, rows: list[list[Row]], model: nn.Module, batch_size: int,
                             cache: Path | None) -> None:
        """Summed reference log-probs for every row (columns ref_chosen / ref_rejected), read from `cache` when
        present, else computed in batches and saved there; then the reference is freed."""
        if self.reference is None:
            return
        flat = [r for group in rows for r in group]
        values = read_ref_cache(cache, len(flat)) if cache else None
        if values is None:
            parts = []
            for start in range(0, len(flat), batch_size):
                batch = collate_pairs(flat[start:start + batch_size], self.pad_id)
                parts.append(self.reference.logps(model, batch).sum().reshape(2, -1).T)  # [b, 2]
            values = torch.cat(parts)
            if cache:
                write_ref_cache(cache, values)
        for row, (c, r) in zip(flat, values.tolist()):
            row["ref_chosen"], row["ref_rejected"] = c, r
        log.info("reference log-probs precomputed for %d pairs; reference released", len(flat))
        self.reference.release(model)
        self.reference = None


def read_ref_cache(path: Path, rows: int) -> torch.Tensor | None:
    """Cached [rows, 2] reference log-probs, or None when missing or for another row count."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    values = load_file(str(path))["ref_logps"]
    return values if values.shape[0] == rows else None


def write_ref_cache(path: Path, values: torch.Tensor) -> None:
    """Write the cache atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"ref_logps": values.contiguous()}, str(tmp))
    tmp.replace(path)
