"""Typed config: sections, YAML + overrides, the LLaMA-Factory dialect, validation."""

from tuneforge.config.load import dump, load, load_tree
from tuneforge.config.schema import (
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    TrainConfig,
)

__all__ = ["load", "load_tree", "dump", "RunConfig", "ModelConfig", "FinetuneConfig", "DataConfig", "TrainConfig", "OutputConfig"]
