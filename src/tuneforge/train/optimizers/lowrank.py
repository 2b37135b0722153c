"""GaLore (galore-torch) and APOLLO (apollo-torch): low-rank gradient methods for full and freeze finetuning.

The targeted linear weights form a group carrying the method's settings (rank, update_proj_gap, scale, ...);
the other trainable parameters are plain groups of the same optimizer, as in LLaMA-Factory. The packages keep a
projector object per weight in the optimizer state: `register_projector_hooks` turns it into plain data in
state_dict() and back in load_state_dict(), so checkpoints stay loadable with torch.load(weights_only=True).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from tuneforge.config.schema import TrainConfig
from tuneforge.deps import require
from tuneforge.errors import ConfigError
from tuneforge.train.optim import NO_DECAY, trainable
from tuneforge.train.optimizers.joint import JointOptimizer

log = logging.getLogger(__name__)

HEAD_NAMES = ("lm_head", "output_layer", "embed_out", "score", "v_head", "summary")
PROJECTOR_KEY = "__projector__"


def target_weights(model: nn.Module, targets: list[str], key: str) -> list[nn.Parameter]:
    """Trainable 2-D weights of nn.Linear modules whose name contains a target (['all']: every linear but the head)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if targets == ["all"]:
            chosen = name.rsplit(".", 1)[-1] not in HEAD_NAMES
        else:
            chosen = any(t in name for t in targets)
        if chosen:
            found += [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    if not found:
        raise ConfigError(f"train.{key}.target {targets} matches no trainable linear layer; use ['all'] or names "
                          "such as q_proj, v_proj, mlp")
    return found


def method_groups(model: nn.Module, train: TrainConfig, targeted: list[nn.Parameter],
                  settings: dict[str, Any]) -> list[dict[str, Any]]:
    """[no decay, decay, targeted weights with the method's settings]; empty groups dropped."""
    ids = {id(p) for p in targeted}
    rest = [(n, p) for n, p in trainable(model) if id(p) not in ids]
    no_decay = [p for n, p in rest if any(k in n.lower() for k in NO_DECAY)]
    decay = [p for n, p in rest if not any(k in n.lower() for k in NO_DECAY)]
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": train.weight_decay},
              {"params": targeted, "weight_decay": train.weight_decay, **settings}]
    return [g for g in groups if g["params"]]


def galore_class(train: TrainConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """GaLore's AdamW, 8-bit AdamW or Adafactor after train.optimizer (LLaMA-Factory's choice by `optim`)."""
    require("galore_torch", "optimizers")
    from galore_torch import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

    adam = {"lr": train.learning_rate, "betas": (train.adam_beta1, train.adam_beta2), "eps": train.adam_epsilon}
    if train.optimizer == "adamw":
        return GaLoreAdamW, {**adam, "no_deprecation_warning": True}
    if train.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return GaLoreAdamW8bit, adam
    if train.optimizer == "adafactor":
        return GaLoreAdafactor, {"lr": train.learning_rate, "relative_step": False, "scale_parameter": False}
    raise ConfigError(f"train.galore works with train.optimizer adamw, adamw_8bit or adafactor, not "
                      f"'{train.optimizer}'")


def build_galore(model: nn.Module, train: TrainConfig, world_size: int = 1) -> torch.optim.Optimizer:
    """GaLore over the targeted weights (projected gradients), plain updates for the rest."""
    g = train.galore
    cls, kwargs = galore_class(train)
    settings = {"rank": g.rank, "update_proj_gap": g.update_interval, "scale": g.scale, "proj_type": g.proj_type}
    groups = method_groups(model, train, target_weights(model, g.target, "galore"), settings)
    if g.layerwise:
        return layerwise(cls, kwargs, groups, train, world_size, "galore")
    return register_projector_hooks(cls(groups, **kwargs))


def build_apollo(model: nn.Module, train: TrainConfig, world_size: int = 1) -> torch.optim.Optimizer:
    """APOLLO's AdamW: gradients of the targeted weights scaled by factors from a low-rank space."""
    require("apollo_torch", "optimizers")
    from apollo_torch import APOLLOAdamW

    a = train.apollo
    if train.optimizer != "adamw":
        raise ConfigError(f"train.apollo works with train.optimizer adamw only, not '{train.optimizer}'")
    settings = {"rank": a.rank, "proj": a.proj, "proj_type": a.proj_type, "update_proj_gap": a.update_interval,
                "scale": a.scale, "scale_type": a.scale_type}
    groups = method_groups(model, train, target_weights(model, a.target, "apollo"), settings)
    # scale_front is a constructor argument of APOLLOAdamW (LLaMA-Factory 0.9.5 puts it in the group, where the
    # package never reads it); passing it here gives the key its documented effect.
    kwargs = {"lr": train.learning_rate, "betas": (train.adam_beta1, train.adam_beta2), "eps": train.adam_epsilon,
              "scale_front": a.scale_front}
    if a.layerwise:
        return layerwise(APOLLOAdamW, kwargs, groups, train, world_size, "apollo")
    return register_projector_hooks(APOLLOAdamW(groups, **kwargs))


def layerwise(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], groups: list[dict[str, Any]],
              train: TrainConfig, world_size: int, key: str) -> JointOptimizer:
    """One optimizer per parameter, stepped and zeroed by a hook as soon as its gradient is accumulated.

    The joint object's groups are the per-parameter groups, so the loop's single scheduler drives them all.
    """
    if world_size > 1:
        raise ConfigError(f"train.{key}.layerwise does not work with several processes (DDP), as in "
                          f"LLaMA-Factory; set train.{key}.layerwise=false")
    if train.max_grad_norm > 0:
        log.warning("train.%s.layerwise: gradients are applied and freed during the backward pass, so "
                    "train.max_grad_norm is not applied and the logged grad_norm is 0", key)
    parts: dict[str, torch.optim.Optimizer] = {}
    by_param: dict[nn.Parameter, torch.optim.Optimizer] = {}
    for group in groups:
        for param in group["params"]:
            single = register_projector_hooks(cls([{**group, "params": [param]}], **kwargs))
            parts[str(len(parts))] = single
            by_param[param] = single

    def step_now(param: nn.Parameter) -> None:
        if param.grad is not None:
            by_param[param].step()
            by_param[param].zero_grad(set_to_none=True)

    for param in by_param:
        param.register_post_accumulate_grad_hook(step_now)
    return JointOptimizer(parts, stepped_in_hooks=True)


def register_projector_hooks(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Save projector objects as {__projector__: class name, attributes} and rebuild them before loading.

    They are rebuilt before torch's own loading because it copies state values it can iterate (and would mangle
    the attribute strings); the objects are passed through as they are.
    """
    optimizer.register_state_dict_post_hook(_projectors_to_data)
    optimizer.register_load_state_dict_pre_hook(_projectors_from_data)
    return optimizer


def _projector_classes() -> dict[str, type]:
    classes: dict[str, type] = {}
    try:
        from galore_torch.galore_projector import GaLoreProjector
        classes["galore_torch.GaLoreProjector"] = GaLoreProjector
    except ImportError:
        pass
    try:
        from apollo_torch.random_projector import GradientProjector
        from apollo_torch.svd_projector import GaLoreProjector as ApolloSVDProjector
        classes["apollo_torch.GradientProjector"] = GradientProjector
        classes["apollo_torch.GaLoreProjector"] = ApolloSVDProjector
    except ImportError:
        pass
    return classes


def _map_projectors(state_dict: dict[str, Any], convert: Any) -> dict[str, Any]:
    state = {key: ({**entry, "projector": convert(entry["projector"])} if "projector" in entry else entry)
             for key, entry in state_dict["state"].items()}
    return {**state_dict, "state": state}


def _projectors_to_data(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    names = {cls: name for name, cls in _projector_classes().items()}
    return _map_projectors(state_dict, lambda obj: {PROJECTOR_KEY: names[type(obj)], **vars(obj)})


def _projectors_from_data(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    classes = _projector_classes()

    def rebuild(data: Any) -> Any:
        if not (isinstance(data, dict) and PROJECTOR_KEY in data):
            return data
        fields = dict(data)
        projector = object.__new__(classes[fields.pop(PROJECTOR_KEY)])
        projector.__dict__.update(fields)
        return projector

    return _map_projectors(state_dict, rebuild)
