"""Optimizers by name and learning-rate schedules with warmup."""

from __future__ import annotations

import math

import torch
from torch import nn

from tuneforge.config.schema import TrainConfig

NO_DECAY = ("bias", "norm", "ln_")


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """The named torch optimizer over trainable parameters; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if any(k in name.lower() for k in NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    lr = train.learning_rate
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if train.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr)
    if train.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=lr, relative_step=False, scale_parameter=False)


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    """warmup_steps when set, else ceil(warmup_ratio * total_steps)."""
    return train.warmup_steps if train.warmup_steps > 0 else math.ceil(train.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' schedule of that name, stepped once per optimizer step."""
    from transformers import get_scheduler

    return get_scheduler(train.scheduler, optimizer, num_warmup_steps=warmup_steps(train, total_steps),
                         num_training_steps=total_steps)
