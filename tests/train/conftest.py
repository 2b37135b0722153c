"""Helpers to train the tiny model in-process and look at its parameters."""

from __future__ import annotations

import pytest
import torch

from tuneforge.config import load


@pytest.fixture
def make_cfg(tmp_path, tiny_model_dir):
    """RunConfig for the tiny model on a slice of the identity set, plus overrides."""

    def make(*overrides: str):
        base = [f"model.path={tiny_model_dir}", "data.dataset=identity", "data.template=chatml",
                "data.cutoff_len=128", "data.max_samples=16", "train.batch_size=4",
                "train.gradient_accumulation_steps=1", "train.learning_rate=1e-2", "train.max_steps=3",
                "train.logging_steps=1", "train.save_steps=0", "train.precision=fp32",
                f"output.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
        return load(None, base + list(overrides))

    return make


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter by name (4-bit weights as their packed bytes)."""
    return {n: p.detach().clone().float() for n, p in model.named_parameters()}


def train_in_process(cfg):
    """Run the same steps as run.train but hand back the model and result for inspection."""
    from tuneforge.data.build import build_datasets
    from tuneforge.models.load import load_tokenizer
    from tuneforge.run import (
        forward_tokens,
        load_for_training,
        make_accelerator,
        prepare_run_dir,
        stage_for,
        training_rows,
    )
    from tuneforge.templates import get_template
    from tuneforge.train.batches import BatchPlan
    from tuneforge.train.loop import RunContext, fit

    acc, precision = make_accelerator(cfg.train)
    run_dir = prepare_run_dir(cfg.output, cfg.train, False, True)
    tokenizer = load_tokenizer(cfg.model)
    template = get_template(cfg.data.template, tokenizer)
    data = build_datasets(cfg.data, cfg.stage, template, cfg.train.seed)
    train_rows, val_rows = training_rows(data, cfg)
    model = load_for_training(cfg, precision)
    before = snapshot(model)
    plan = BatchPlan(len(train_rows), cfg.train.batch_size, cfg.train.gradient_accumulation_steps,
                     acc.num_processes, cfg.train.epochs, cfg.train.max_steps)
    result = fit(model, stage_for(cfg.stage, tokenizer.pad_token_id), train_rows, val_rows, cfg.train,
                 RunContext(run_dir, acc, plan, group_by_length=cfg.train.group_by_length,
                            forward_tokens=forward_tokens(cfg.train)))
    return model, before, result
