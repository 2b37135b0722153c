"""Training stages; built-ins register by explicit import below."""

from tuneforge.errors import ConfigError
from tuneforge.stages import causal_lm, dpo, grpo, kto, ppo, rm  # noqa: F401  (register pt, sft, dpo, grpo, kto, ppo, rm)
from tuneforge.stages.base import DataKind, LossOutput, Stage
from tuneforge.stages.registry import STAGES


def stage_class(name: str) -> type[Stage]:
    """The stage class registered under `name`, or a clear message for stages that are not built yet."""
    if name not in STAGES:
        raise ConfigError(f"stage '{name}' is not available yet; available stages: {', '.join(STAGES.names())}")
    return STAGES.get(name)


def data_kind(name: str) -> DataKind:
    """What a stage trains on (text, sft, pairwise, kto, prompt): the one source is the stage class."""
    return stage_class(name).data_kind


def build_stage(cfg, pad_id: int) -> Stage:
    """The configured stage, built from its own config section."""
    return stage_class(cfg.stage).from_config(cfg, pad_id)


__all__ = ["STAGES", "Stage", "LossOutput", "stage_class", "data_kind", "build_stage"]
