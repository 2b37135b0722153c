"""Helpers to train the tiny model in-process (through run.prepare and run.fit_job) and look at its parameters."""

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
    """The production path (run.prepare, then run.fit_job), handing back the model before and after."""
    from tuneforge.run import fit_job, prepare

    job = prepare(cfg)
    before = snapshot(job.model)
    result = fit_job(job)
    return job.model, before, result
