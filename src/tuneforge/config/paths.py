"""Paths a config names, checked when a command starts (before any model loads): files and folders that must
exist, hub ids that may be downloaded later, and output folders that must be creatable."""

from __future__ import annotations

import os
from pathlib import Path

from tuneforge.config.schema import RunConfig
from tuneforge.errors import ConfigError


def looks_like_hub_id(value: str) -> bool:
    """owner/name, not a path (the rule model loading applies: exactly one slash, no leading . / or ~)."""
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and not value.endswith("/")


def check_model_path(key: str, value: str | None) -> None:
    """A local folder, a hub id, or an alias; a file, or a missing path that is clearly local, is an error."""
    from tuneforge.models.embedded import ALIAS

    if not value or value == ALIAS:
        return
    local = Path(value).expanduser()
    if local.is_dir():
        return
    if local.exists():
        raise ConfigError(f"{key}: {value} is a file; give the model's folder (with config.json) or a hub id")
    if not looks_like_hub_id(value):
        raise ConfigError(f"{key}: {value} does not exist; give a local folder or a hub id of the form owner/name")


def check_folder(key: str, value: str, what: str) -> None:
    """A folder that must exist locally."""
    local = Path(value).expanduser()
    if not local.exists():
        raise ConfigError(f"{key}: {value} does not exist; give the path of {what}")
    if not local.is_dir():
        raise ConfigError(f"{key}: {value} is a file; give the folder of {what}")


def check_creatable(key: str, value: str) -> None:
    """An output folder: an existing folder, or a path whose nearest existing parent is a writable folder."""
    path = Path(value).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{key}: {value} is an existing file, not a folder; choose another output folder")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{key}: {value} cannot be created because {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {value} cannot be created: {parent} is not writable")


def check_paths(cfg: RunConfig, output: bool = False) -> None:
    """Every input path of the config (model, adapters, reference and reward models, checkpoint to resume,
    DeepSpeed file, dataset folder); with `output`, the run folder must be creatable too."""
    check_model_path("model.path (model_name_or_path)", cfg.model.path)
    for adapter in cfg.model.adapter_path:
        check_folder("model.adapter_path (adapter_name_or_path)", adapter, "a run, checkpoint or adapter folder")
    check_model_path("reference.model (ref_model)", cfg.reference.model)
    for adapter in cfg.reference.adapters:
        check_folder("reference.adapters (ref_model_adapters)", adapter, "an adapter folder")
    reward = cfg.reward_model
    if reward.path and reward.type != "api":
        if reward.type == "lora":
            check_folder("reward_model.path (reward_model)", reward.path, "a stage rm run or adapter folder")
        else:
            check_model_path("reward_model.path (reward_model)", reward.path)
    for adapter in reward.adapters:
        check_folder("reward_model.adapters (reward_model_adapters)", adapter, "an adapter folder")
    resume = cfg.train.resume_from_checkpoint
    if resume and resume != "auto":
        check_folder("train.resume_from_checkpoint (resume_from_checkpoint)", resume, "a checkpoint folder "
                     "(checkpoints/step-N of a run), or use 'auto'")
    if cfg.train.deepspeed and not Path(cfg.train.deepspeed).expanduser().is_file():
        raise ConfigError(f"train.deepspeed (deepspeed): {cfg.train.deepspeed} not found; give a DeepSpeed JSON "
                          "config such as LLaMA-Factory's examples/deepspeed/ds_z3_config.json")
    if cfg.data.dataset_dir and (cfg.data.dataset or cfg.data.eval_dataset) and \
            Path(cfg.data.dataset_dir).expanduser().is_file():
        raise ConfigError(f"data.dataset_dir (dataset_dir): {cfg.data.dataset_dir} is a file; give the folder "
                          "that holds dataset_info.json")
    if output:
        check_creatable("output.dir (output_dir)", cfg.output.dir)
