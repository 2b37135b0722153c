"""Training stages; built-ins register by explicit import below."""

from tuneforge.stages import causal_lm  # noqa: F401  (registers pt and sft)
from tuneforge.stages.base import LossOutput, Stage
from tuneforge.stages.registry import STAGES

__all__ = ["STAGES", "Stage", "LossOutput"]
