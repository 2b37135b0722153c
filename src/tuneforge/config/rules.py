"""Cross-section rules: small named checks, each with one actionable message."""

from __future__ import annotations

from tuneforge.config.schema import DataConfig, FinetuneConfig, ModelConfig, RunConfig, TrainConfig
from tuneforge.errors import ConfigError

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "rmsprop", "adagrad")


def validate(cfg: RunConfig, source: str) -> None:
    """Run every rule; the first broken one raises ConfigError prefixed with the config's source."""
    try:
        check_quantization(cfg.model, cfg.finetune)
        check_finetune(cfg.finetune)
        check_data(cfg.data)
        check_train(cfg.train)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def check_quantization(model: ModelConfig, finetune: FinetuneConfig) -> None:
    """Quantized bases train only through adapters (QLoRA)."""
    if model.quantization_bit is None:
        return
    if model.quantization_bit not in (4, 8):
        raise ConfigError(f"model.quantization_bit: {model.quantization_bit} is not supported; use 4 or 8")
    if finetune.method != "lora":
        raise ConfigError(
            f"model.quantization_bit is set with finetune.method={finetune.method}: quantized weights cannot be "
            "trained directly. Use finetune.method=lora (QLoRA), or remove quantization_bit."
        )
    if finetune.lora.pissa_init:
        raise ConfigError("finetune.lora.pissa_init cannot initialise from quantized weights; "
                          "remove model.quantization_bit or pissa_init")


def check_finetune(finetune: FinetuneConfig) -> None:
    """Ranks and layer counts must be usable."""
    if finetune.lora.rank < 1:
        raise ConfigError(f"finetune.lora.rank must be >= 1, got {finetune.lora.rank}")
    if not 0 <= finetune.lora.dropout < 1:
        raise ConfigError(f"finetune.lora.dropout must be in [0, 1), got {finetune.lora.dropout}")
    if finetune.method == "freeze" and finetune.freeze.trainable_layers == 0:
        raise ConfigError("finetune.freeze.trainable_layers is 0, so nothing would train; "
                          "use a positive count (last layers) or a negative one (first layers)")


def check_data(data: DataConfig) -> None:
    """Lengths, split sizes and mixing probabilities must be consistent."""
    if data.cutoff_len < 8:
        raise ConfigError(f"data.cutoff_len must be at least 8 tokens, got {data.cutoff_len}")
    if data.val_size < 0 or (data.val_size >= 1 and not float(data.val_size).is_integer()):
        raise ConfigError(f"data.val_size must be a fraction in [0, 1) or a whole row count, got {data.val_size}")
    if data.max_samples is not None and data.max_samples < 1:
        raise ConfigError(f"data.max_samples must be >= 1, got {data.max_samples}")
    if data.mix_strategy != "concat" and data.interleave_probs:
        if len(data.interleave_probs) != len(data.dataset):
            raise ConfigError(f"data.interleave_probs has {len(data.interleave_probs)} values for "
                              f"{len(data.dataset)} datasets; give one probability per dataset")
        if abs(sum(data.interleave_probs) - 1) > 1e-6:
            raise ConfigError(f"data.interleave_probs must sum to 1, got {sum(data.interleave_probs):g}")


def check_train(train: TrainConfig) -> None:
    """Batch sizes, steps and optimizer names must be valid."""
    for name in ("batch_size", "gradient_accumulation_steps", "eval_batch_size"):
        if getattr(train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(train, name)}")
    if train.max_steps <= 0 and train.epochs <= 0:
        raise ConfigError("train.epochs must be > 0 when train.max_steps is not set")
    if train.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate must be > 0, got {train.learning_rate}")
    if not 0 <= train.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {train.warmup_ratio}")
    if train.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer: '{train.optimizer}' is not known; use one of {', '.join(OPTIMIZERS)}")
