"""Typed config: sections, YAML + overrides, the LLaMA-Factory dialect, validation."""

from tuneforge.config.load import dump, load
from tuneforge.config.schema import (
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    TrainConfig,
)

__all__ = ["load", "dump", "RunConfig", "ModelConfig", "FinetuneConfig", "DataConfig", "TrainConfig", "OutputConfig"]
