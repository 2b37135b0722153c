"""Stages whose loss is next-token cross-entropy on trained tokens: pt and sft (plus sft's reweighted losses).

sft.loss other than ce (LLaMA-Factory's use_dft_loss / use_eaft_loss / use_asft_loss) reweights each trained
token's log-loss; evaluation still reports plain cross-entropy, so eval loss and perplexity stay comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tuneforge.config.schema import RunConfig, SFTConfig
from tuneforge.data.encode import IGNORE_INDEX
from tuneforge.stages.base import (
    Batch,
    LossOutput,
    Row,
    Stage,
    attention_mask,
    batch_token_logps,
    decoder_hidden,
    metric,
    model_mask,
    pad,
    unwrap_causal_lm,
    uses_fused_head,
)
from tuneforge.stages.reference import Reference, build_reference
from tuneforge.stages.registry import STAGES
from tuneforge.train.losses import logits_topk_entropy, token_kl, token_logps, topk_entropy

EAFT_TOP_K = 20  # EAFT estimates the entropy from the 20 largest logits ...
EAFT_SCALE = 3.0  # ... and divides by ~ln(20), the most that estimate can be, so weights lie in [0, 1]


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
            # Neat-packed rows: no attention mask, so transformers builds a block-diagonal causal mask from the
            # position ids; padding continues the numbering as its own segment and is never trained.
            longest = batch["input_ids"].shape[1]
            batch["position_ids"] = torch.stack([
                torch.tensor(r["position_ids"] + list(range(longest - len(r["position_ids"]))), dtype=torch.long)
                for r in rows])
        if "position_ids" not in rows[0] or rows[0].get("cross_attention"):
            # plain (not neat) packing: an explicit mask means one causal span, so packed rows see each other
            batch["attention_mask"] = attention_mask(ids)
        return batch

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Next-token cross-entropy."""
        return causal_lm_loss(model, batch)


@dataclass
class TrainedOutputs:
    """What the output head sees at a batch's trained positions: hidden states and the head weight (fused heads),
    or the model's own logits (heads with soft-capping or scaling)."""

    targets: Tensor  # [n] next tokens
    hidden: Tensor | None = None  # [n, h]
    weight: Tensor | None = None  # [v, h]
    logits: Tensor | None = None  # [n, v] fp32

    def logps(self) -> Tensor:
        """log p(target) per trained token, [n] fp32; per-token gradients allowed."""
        if self.logits is None:
            return token_logps(self.hidden, self.weight, self.targets)[0]
        return self.logits.log_softmax(-1).gather(1, self.targets[:, None]).squeeze(1)

    def full_logits(self) -> Tensor:
        """[n, v] fp32 logits (materialised; only for heads that cannot be fused on both sides of a KL)."""
        return self.logits if self.logits is not None else (self.hidden @ self.weight.T).float()


def trained_outputs(model: nn.Module, batch: Batch) -> TrainedOutputs:
    """Hidden states (or logits) at every position whose next token is trained (labels != -100)."""
    lm = unwrap_causal_lm(model)
    labels = batch["labels"][:, 1:]  # position i predicts token i+1
    keep = labels != IGNORE_INDEX
    if uses_fused_head(lm):
        hidden = decoder_hidden(lm, batch)[:, :-1][keep]
        return TrainedOutputs(labels[keep], hidden=hidden, weight=lm.get_output_embeddings().weight)
    logits = lm(input_ids=batch["input_ids"], attention_mask=model_mask(batch),
                position_ids=batch.get("position_ids"), use_cache=False).logits[:, :-1][keep].float()
    return TrainedOutputs(labels[keep], logits=logits)


def dft_losses(logps: Tensor) -> Tensor:
    """DFT per token, [n]: the log-loss scaled by the token's own probability (detached: a weight, not a path)."""
    return -logps * logps.detach().exp()


def eaft_losses(logps: Tensor, entropy: Tensor, alpha: float) -> Tensor:
    """EAFT per token, [n]: the log-loss scaled by (top-k entropy / ln k) ** alpha, so confident positions weigh
    less; `entropy` carries no gradient."""
    return -logps * (entropy / EAFT_SCALE).pow(alpha)


def asft_losses(logps: Tensor, kl: Tensor, alpha: float) -> Tensor:
    """ASFT per token, [n]: DFT plus alpha * KL(reference || policy) over the whole next-token distribution."""
    return dft_losses(logps) + alpha * kl


def reference_kl(policy: TrainedOutputs, reference: TrainedOutputs) -> Tensor:
    """KL(reference || policy) per trained token, [n] fp32, gradient to the policy only."""
    if policy.logits is None and reference.logits is None:
        return token_kl(policy.hidden, policy.weight, reference.hidden, reference.weight)
    logp = policy.full_logits().log_softmax(-1)
    logq = reference.full_logits().detach().log_softmax(-1)
    return (logq.exp() * (logq - logp)).sum(-1)


@STAGES.register("sft")
class SFTStage(CausalLMStage):
    """Supervised fine-tuning on conversations: responses trained, prompts masked."""

    name = "sft"
    data_kind = "sft"

    def __init__(self, pad_id: int, settings: SFTConfig | None = None, run: RunConfig | None = None) -> None:
        super().__init__(pad_id)
        self.settings = settings or SFTConfig()
        self.run = run or RunConfig()
        self.reference: Reference | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, pad_id: int) -> SFTStage:
        return cls(pad_id, cfg.sft, cfg)

    def setup(self, model: nn.Module, acc: Any) -> nn.Module:
        """ASFT anchors to a reference model (see stages.reference for which weights it is)."""
        if self.settings.loss == "asft":
            self.reference = build_reference(self.run, model, acc.device)
        return model

    def describe(self) -> str:
        """One line for the plan: the loss, its alpha and the reference in use."""
        loss = self.settings.loss
        if loss == "eaft":
            return f"sft loss eaft, alpha {self.settings.eaft_alpha:g}"
        if loss == "asft":
            ref = self.reference.description if self.reference else "not set up"
            return f"sft loss asft, alpha {self.settings.asft_alpha:g}; reference: {ref}"
        return self.name if loss == "ce" else f"sft loss {loss}"

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Cross-entropy, or while training the configured reweighted loss (summed over trained tokens)."""
        if self.settings.loss == "ce" or not torch.is_grad_enabled():
            return causal_lm_loss(model, batch)
        return self.reweighted_loss(model, batch)

    def reweighted_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """DFT, EAFT or ASFT summed over trained tokens, with the plain cross-entropy (and KL) as metrics."""
        outputs = trained_outputs(model, batch)
        logps = outputs.logps()  # [n]
        n = torch.tensor(logps.shape[0])
        metrics = {"ce": metric(-logps.detach().sum(), n)}
        if self.settings.loss == "dft":
            losses = dft_losses(logps)
        elif self.settings.loss == "eaft":
            entropy = topk_entropy(outputs.hidden, outputs.weight, EAFT_TOP_K) if outputs.logits is None \
                else logits_topk_entropy(outputs.logits, EAFT_TOP_K)
            losses = eaft_losses(logps, entropy, self.settings.eaft_alpha)
        else:
            if self.reference is None:
                raise RuntimeError("sft loss asft needs its reference: call setup() first")
            with self.reference.active(model) as ref_model:
                ref = trained_outputs(ref_model, batch)
            kl = reference_kl(outputs, ref)
            metrics["kl"] = metric(kl.detach().sum(), n)
            losses = asft_losses(logps, kl, self.settings.asft_alpha)
        return LossOutput(losses.sum(), n, metrics)


@STAGES.register("pt")
class PretrainStage(CausalLMStage):
    """Continued pre-training on plain text: every token trained."""

    name = "pt"
    data_kind = "text"
