"""Optimizers (LLaMA-Factory's set, each from its own package) and learning-rate schedules with warmup.

`build_optimizer` returns one object the loop steps, zeroes, schedules and checkpoints whatever the algorithm:
a torch or bitsandbytes optimizer, LoRA+ parameter groups on one, GaLore/APOLLO (galore-torch, apollo-torch),
BAdam (badam), Adam-mini (adam-mini) or Muon (torch.optim.Muon beside torch AdamW). `describe_optimizer` names
the same choice for the plan and the manifest before anything is built.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tuneforge.config.schema import LoraConfig, TrainConfig
from tuneforge.deps import require
from tuneforge.errors import ConfigError

NO_DECAY = ("bias", "norm", "ln_")
BASE_RULES = ("adamw", "adam", "sgd", "rmsprop", "adagrad", "adafactor", "adamw_8bit", "paged_adamw_8bit")


def base_rule(train: TrainConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The class of train.optimizer and its keyword arguments besides the parameters (transformers' choices)."""
    lr, name = train.learning_rate, train.optimizer
    adam = {"lr": lr, "betas": (train.adam_beta1, train.adam_beta2), "eps": train.adam_epsilon}
    if name == "adamw":
        return torch.optim.AdamW, adam
    if name == "adam":
        return torch.optim.Adam, adam
    if name == "sgd":
        return torch.optim.SGD, {"lr": lr, "momentum": 0.9}
    if name == "rmsprop":
        return torch.optim.RMSprop, {"lr": lr}
    if name == "adagrad":
        return torch.optim.Adagrad, {"lr": lr}
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor, {"lr": lr, "relative_step": False, "scale_parameter": False}
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        require("bitsandbytes", "qlora")
        import bitsandbytes as bnb

        return bnb.optim.AdamW, {**adam, "optim_bits": 8, "is_paged": name.startswith("paged")}
    raise ConfigError(f"train.optimizer '{name}' has no plain form here; use one of {', '.join(BASE_RULES)}")


def decay_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights with decay, biases and norms without; empty groups dropped."""
    decay = [p for n, p in named if not any(k in n.lower() for k in NO_DECAY)]
    no_decay = [p for n, p in named if any(k in n.lower() for k in NO_DECAY)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that trains."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, train: TrainConfig, lora: LoraConfig | None = None,
                    world_size: int = 1) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters; no weight decay on biases and norms."""
    if train.galore.enabled or train.apollo.enabled:
        from tuneforge.train.optimizers import lowrank

        if train.galore.enabled:
            return lowrank.build_galore(model, train, world_size)
        return lowrank.build_apollo(model, train, world_size)
    if lora is not None and lora.plus_lr_ratio is not None:
        return build_loraplus(model, train, lora)
    if train.badam.enabled:
        require("badam", "optimizers")
        from tuneforge.train.optimizers.badam import build_badam

        return build_badam(model, train, world_size)
    if train.optimizer == "adam_mini":
        return build_adam_mini(model, train)
    if train.optimizer == "muon":
        return build_muon(model, train)
    cls, kwargs = base_rule(train)
    named = trainable(model)
    if fused_adam_applies(cls, [p for _, p in named], train):
        kwargs["fused"] = True
    return cls(decay_groups(named, train.weight_decay), **kwargs)


def fused_adam_applies(cls: type, params: list[nn.Parameter], train: TrainConfig) -> bool:
    """torch's fused Adam/AdamW kernel: the same update as the per-tensor loop, one pass per tensor instead of a
    dozen (full finetuning of a 135M model on 2 CPU cores: ~0.1 s per step instead of ~0.5 s). Used for plain
    floating-point tensors on one CPU or CUDA device; sharded weights (FSDP's DTensors, DeepSpeed's partitions) keep
    the default."""
    if cls not in (torch.optim.AdamW, torch.optim.Adam) or train.fsdp.enabled or train.deepspeed or not params:
        return False
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(type(p) is nn.Parameter and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                    for p in params))


def build_loraplus(model: nn.Module, train: TrainConfig, lora: LoraConfig) -> torch.optim.Optimizer:
    """LoRA+ (peft's create_loraplus_optimizer): B matrices and 1-D params at lr * ratio, embedding adapters at
    plus_lr_embedding, the rest (A matrices) at lr; no weight decay on biases and norms."""
    from peft.optimizers import create_loraplus_optimizer

    cls, kwargs = base_rule(train)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(model, cls, lr=train.learning_rate, loraplus_lr_ratio=lora.plus_lr_ratio,
                                     loraplus_lr_embedding=lora.plus_lr_embedding,
                                     loraplus_weight_decay=train.weight_decay, **kwargs)


def build_adam_mini(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """Adam-mini: one second-moment value per block (head, neuron, token), sized from the model's config."""
    require("adam_mini", "optimizers")
    from adam_mini import Adam_mini

    config = model_config(model)
    return Adam_mini(named_parameters=trainable(model), lr=train.learning_rate,
                     betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon,
                     weight_decay=train.weight_decay, dim=config.hidden_size, n_heads=config.num_attention_heads,
                     n_kv_heads=getattr(config, "num_key_value_heads", None), verbose=False)


def model_config(model: nn.Module) -> Any:
    """The transformers config under PEFT and value-head wrappers."""
    inner = model
    while not hasattr(inner, "config") and hasattr(inner, "pretrained_model"):
        inner = inner.pretrained_model
    config = getattr(inner, "config", None)
    if config is None or not hasattr(config, "hidden_size") or not hasattr(config, "num_attention_heads"):
        raise ConfigError("train.optimizer=adam_mini needs a transformer config with hidden_size and "
                          "num_attention_heads; this model has none")
    return config


def muon_split(model: nn.Module) -> tuple[list, list]:
    """LLaMA-Factory's rule: 2-D hidden weights (not embeddings or the head) for Muon, the rest for AdamW."""
    muon, rest = [], []
    for name, param in trainable(model):
        hidden_matrix = param.ndim == 2 and "embed" not in name and "lm_head" not in name
        (muon if hidden_matrix else rest).append((name, param))
    return muon, rest


def build_muon(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """torch.optim.Muon on hidden matrices (momentum 0.95, Nesterov, 5 Newton-Schulz steps, lr scaled to match
    AdamW's update RMS, as LLaMA-Factory's Muon) and torch AdamW on the rest, joined into one optimizer."""
    from tuneforge.train.optimizers.joint import JointOptimizer

    muon, rest = muon_split(model)
    parts: dict[str, torch.optim.Optimizer] = {}
    if muon:
        parts["muon"] = torch.optim.Muon([p for _, p in muon], lr=train.learning_rate, weight_decay=train.weight_decay,
                                         momentum=0.95, nesterov=True, ns_steps=5, adjust_lr_fn="match_rms_adamw")
    if rest:
        parts["adamw"] = torch.optim.AdamW(decay_groups(rest, train.weight_decay), lr=train.learning_rate,
                                           betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon)
    return JointOptimizer(parts)


def describe_optimizer(train: TrainConfig, lora: LoraConfig | None = None) -> str:
    """The optimizer class build_optimizer makes for this config and its key settings, for the plan and manifest."""
    if train.galore.enabled:
        g = train.galore
        inner = {"adafactor": "GaLoreAdafactor", "adamw_8bit": "GaLoreAdamW8bit",
                 "paged_adamw_8bit": "GaLoreAdamW8bit"}.get(train.optimizer, "GaLoreAdamW")
        return (f"galore_torch.{inner} (rank {g.rank}, projection every {g.update_interval} steps, scale {g.scale}, "
                f"{g.proj_type}{', layerwise' if g.layerwise else ''})")
    if train.apollo.enabled:
        a = train.apollo
        return (f"apollo_torch.APOLLOAdamW (rank {a.rank}, {a.proj} projection every {a.update_interval} steps, "
                f"scale {a.scale} per {a.scale_type}{', layerwise' if a.layerwise else ''})")
    if lora is not None and lora.plus_lr_ratio is not None:
        return f"{_class_name(train)} with LoRA+ groups (B matrices at lr x {lora.plus_lr_ratio:g})"
    if train.badam.enabled:
        b = train.badam
        if b.mode == "ratio":
            return f"badam.BlockOptimizerRatio (update ratio {b.update_ratio}, {b.mask_mode} masks)"
        return (f"badam.BlockOptimizer over {_class_name(train)} (one layer at a time, {b.switch_mode}, "
                f"switching every {b.switch_interval} steps)")
    if train.optimizer == "adam_mini":
        return "adam_mini.Adam_mini"
    if train.optimizer == "muon":
        return "torch.optim.Muon on hidden matrices + torch.optim.AdamW on the rest"
    return _class_name(train)


def _class_name(train: TrainConfig) -> str:
    return {"adamw": "torch.optim.AdamW", "adam": "torch.optim.Adam", "sgd": "torch.optim.SGD",
            "rmsprop": "torch.optim.RMSprop", "adagrad": "torch.optim.Adagrad",
            "adafactor": "transformers.optimization.Adafactor", "adamw_8bit": "bitsandbytes.optim.AdamW (8-bit)",
            "paged_adamw_8bit": "bitsandbytes.optim.AdamW (8-bit, paged)"}.get(train.optimizer, train.optimizer)


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    """warmup_steps when set, else ceil(warmup_ratio * total_steps)."""
    return train.warmup_steps if train.warmup_steps > 0 else math.ceil(train.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' schedule of that name, stepped once per optimizer step."""
    from transformers import get_scheduler

    return get_scheduler(train.scheduler, optimizer, num_warmup_steps=warmup_steps(train, total_steps),
                         num_training_steps=total_steps)
