"""Which weights train: full, freeze (some layers) or LoRA adapters via peft."""

from tuneforge.finetune.methods import apply_method, count_parameters

__all__ = ["apply_method", "count_parameters"]
