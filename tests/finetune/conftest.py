"""The tiny-model training helpers of tests/train, shared with the fine-tuning method tests."""

import torch

from tests.train.conftest import make_cfg, snapshot, train_in_process  # noqa: F401


def logits(model, ids):
    """Logits without gradients."""
    with torch.no_grad():
        return model(input_ids=ids).logits


def train_and_save(cfg):
    """The production path with the final save (run.prepare, fit_job, finish); the model before and after."""
    from tuneforge.run import finish, fit_job, prepare

    job = prepare(cfg)
    before = snapshot(job.model)
    finish(job, fit_job(job))
    return job, before
