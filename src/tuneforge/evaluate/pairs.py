"""Evaluation of preference-trained weights (stages rm, dpo, kto): the stage to evaluate as, the model and reference
its loss runs on, log-prob preference figures for any model, and reward-model scores of pairs."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.chat.engine import ChatEngine
from tuneforge.config.rules import PREFERENCE_STAGES
from tuneforge.config.schema import DataConfig, RunConfig
from tuneforge.data.build import build_datasets
from tuneforge.data.catalog import get_spec, load_catalog
from tuneforge.io import write_text_atomic
from tuneforge.stages.base import Stage, batch_token_logps
from tuneforge.stages.dpo import PAIR_COLUMNS, DPOStage, collate_pairs
from tuneforge.stages.kto import KTOStage
from tuneforge.stages.reference import Reference, build_reference, freeze

log = logging.getLogger(__name__)



def resolve_stage(cfg: RunConfig, engine: ChatEngine) -> tuple[RunConfig, bool]:
    """The stage to evaluate as: the config's, or, while the config keeps the default (sft), the preference stage
    the weights were trained with (tuneforge_run.json); True when it came from the weights."""
    recorded = engine.info.get("stage")
    if cfg.stage == RunConfig.stage and recorded in PREFERENCE_STAGES:
        log.info("evaluating as stage %s, as recorded beside the weights", recorded)
        return replace(cfg, stage=recorded), True
    return cfg, False


def stage_model(stage: Stage, engine: ChatEngine, adapter: bool, cfg: RunConfig) -> nn.Module | None:
    """The module the stage's loss runs on, set up for evaluation (never re-initialised): base + adapter + the saved
    value head for rm, the policy with its reference for dpo/kto. None when the weights have nothing to measure
    (the base model of a LoRA reward model has no value head)."""
    if stage.name == "rm":
        if adapter is False and not engine.is_reward_model(False):
            return None
        return engine.reward_model(adapter)
    if isinstance(stage, KTOStage) or (isinstance(stage, DPOStage) and stage.uses_reference):
        stage.reference = eval_reference(cfg, engine, adapter)
    return engine.model


def eval_reference(cfg: RunConfig, engine: ChatEngine, adapter: bool) -> Reference:
    """The reference of dpo/kto in evaluation: reference.model when configured; for a tuned adapter the base model
    (the adapter switched off); for a full run's model the base it started from; otherwise the model itself."""
    from tuneforge.models.load import load_model

    if cfg.reference.model:
        return build_reference(cfg, engine.model)
    if adapter is not False and engine.has_adapter:
        return Reference("adapter-off", "the base model (the tuned adapter switched off)")
    base = engine.info.get("base_model")
    if adapter is not False and base and base != cfg.model.path:
        model = load_model(replace(cfg.model, path=base, adapter_path=[]))
        return Reference("separate", f"the base model {base} the run started from", freeze(model))
    return Reference("separate", "the evaluated model itself (no tuned weights on top of it)", engine.model)


def pairwise_data(data: DataConfig) -> bool:
    """Whether every dataset of this data section holds preference pairs (dataset_info "ranking": true)."""
    catalog = load_catalog(data.dataset_dir, data.inline)
    return all(get_spec(catalog, name, data.dataset_dir).ranking for name in data.dataset)


def pair_rows(data: DataConfig, engine: ChatEngine, seed: int) -> list[dict[str, Any]]:
    """Encoded preference pairs (chosen/rejected ids and labels, and each row's origin), as training encodes them."""
    encoded = build_datasets(data, "pairwise", engine.template, seed)
    columns = [*PAIR_COLUMNS, "origin"]
    return [dict(zip(columns, values)) for values in zip(*(encoded.train[c] for c in columns))]


def pair_figures(engine: ChatEngine, adapter: bool, rows: list[dict[str, Any]], batch_size: int) -> dict[str, float]:
    """preference_accuracy: share of pairs whose chosen answer has a strictly higher summed log-prob than the
    rejected one; logp_margin: mean of (chosen - rejected) summed log-probs. Any model, tuned or base."""
    chosen: list[float] = []
    rejected: list[float] = []
    device = next(engine.model.parameters()).device
    with engine.adapter_context(adapter), torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate_pairs(rows[start:start + batch_size], engine.tokenizer.pad_token_id)
            sums = batch_token_logps(engine.model, {k: v.to(device) for k, v in batch.items()}).sum()  # [2b]
            half = sums.shape[0] // 2
            chosen += sums[:half].tolist()
            rejected += sums[half:].tolist()
    wins = sum(c > r for c, r in zip(chosen, rejected))
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)
    return {"preference_accuracy": round(wins / len(chosen), 6), "logp_margin": round(margin, 6),
            "pairs": len(chosen)}


def reward_predictions(engine: ChatEngine, adapter: bool, rows: list[dict[str, Any]], batch_size: int,
                       path: Path) -> dict[str, Any] | None:
    """Score both answers of every pair with the reward model; write predictions.jsonl lines
    {"origin", "chosen", "rejected"} (scores rounded to 2 decimals, as LLaMA-Factory) and report accuracy (share of
    pairs whose chosen answer scores strictly higher). None when these weights have no value head."""
    if adapter is False and not engine.is_reward_model(False):
        return None
    chosen = engine.score([r["chosen_input_ids"] for r in rows], adapter, batch_size)
    rejected = engine.score([r["rejected_input_ids"] for r in rows], adapter, batch_size)
    lines = [json.dumps({"origin": r["origin"], "chosen": round(c, 2), "rejected": round(j, 2)}, ensure_ascii=False)
             for r, c, j in zip(rows, chosen, rejected)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    wins = sum(c > j for c, j in zip(chosen, rejected))
    return {"accuracy": round(wins / len(rows), 6), "mean_chosen": round(sum(chosen) / len(rows), 6),
            "mean_rejected": round(sum(rejected) / len(rows), 6), "rows": len(rows), "file": str(path)}
