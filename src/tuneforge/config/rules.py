"""Cross-section rules: small named checks, each with one actionable message."""

from __future__ import annotations

from tuneforge.config.schema import (
    DataConfig,
    DPOConfig,
    FinetuneConfig,
    KTOConfig,
    ModelConfig,
    ReferenceConfig,
    RunConfig,
    TrainConfig,
)
from tuneforge.errors import ConfigError

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "rmsprop", "adagrad")


def validate(cfg: RunConfig, source: str) -> None:
    """Run every rule; the first broken one raises ConfigError prefixed with the config's source."""
    try:
        check_quantization(cfg.model, cfg.finetune)
        check_finetune(cfg.finetune)
        check_data(cfg.data)
        check_train(cfg.train)
        check_stage_data(cfg.stage, cfg.data)
        check_dpo(cfg.dpo)
        check_kto(cfg.kto)
        check_reference(cfg.reference, cfg.stage, cfg.dpo, cfg.finetune)
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


PREFERENCE_STAGES = ("rm", "dpo", "kto")
NO_REFERENCE_LOSSES = ("orpo", "simpo")


def check_stage_data(stage: str, data: DataConfig) -> None:
    """Packing and prompt-side training exist for pt/sft only (as in LLaMA-Factory)."""
    if stage not in PREFERENCE_STAGES:
        return
    for key in ("packing", "train_on_prompt", "mask_history"):
        if getattr(data, key):
            raise ConfigError(f"data.{key} is for the sft stage; stage {stage} trains on whole answers. "
                              f"Remove data.{key}")


def check_dpo(dpo: DPOConfig) -> None:
    """beta positive; label smoothing only for the sigmoid loss and below 0.5."""
    if dpo.beta is not None and dpo.beta <= 0:
        raise ConfigError(f"dpo.beta (pref_beta) must be > 0, got {dpo.beta}")
    if not 0 <= dpo.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {dpo.label_smoothing}")
    if dpo.label_smoothing > 0 and dpo.loss != "sigmoid":
        raise ConfigError(f"dpo.label_smoothing (cDPO) applies to the sigmoid loss only, not dpo.loss={dpo.loss}")
    if dpo.ld_alpha is not None and not 0 <= dpo.ld_alpha <= 1:
        raise ConfigError(f"dpo.ld_alpha must be in [0, 1], got {dpo.ld_alpha}")
    if dpo.bco_weight < 0 or dpo.ftx < 0:
        raise ConfigError("dpo.bco_weight and dpo.ftx must be >= 0")
    if dpo.bco_weight > 0 and dpo.loss in NO_REFERENCE_LOSSES:
        raise ConfigError(f"dpo.bco_weight needs a reference model, which dpo.loss={dpo.loss} does not use")


def check_kto(kto: KTOConfig) -> None:
    """beta and class weights positive."""
    if kto.beta <= 0:
        raise ConfigError(f"kto.beta (pref_beta) must be > 0, got {kto.beta}")
    if kto.chosen_weight <= 0 or kto.rejected_weight <= 0:
        raise ConfigError("kto.chosen_weight and kto.rejected_weight must be > 0")
    if kto.ftx < 0:
        raise ConfigError(f"kto.ftx must be >= 0, got {kto.ftx}")


def uses_reference(stage: str, dpo: DPOConfig) -> bool:
    """dpo (except orpo and simpo) and kto compare the policy with a reference model."""
    return stage == "kto" or (stage == "dpo" and dpo.loss not in NO_REFERENCE_LOSSES)


def check_reference(ref: ReferenceConfig, stage: str, dpo: DPOConfig, finetune: FinetuneConfig) -> None:
    """Reference settings must be used and loadable; PiSSA moves the base, so the adapter-off reference breaks."""
    if ref.quantization_bit not in (None, 4, 8):
        raise ConfigError(f"reference.quantization_bit: {ref.quantization_bit} is not supported; use 4 or 8")
    if (ref.adapters or ref.quantization_bit) and not ref.model:
        raise ConfigError("reference.adapters / reference.quantization_bit apply to a separate reference model; "
                          "set reference.model (LLaMA-Factory: ref_model) as well")
    if ref.precompute and stage != "dpo":
        raise ConfigError(f"reference.precompute (precompute_ref_log_probs) is available for stage dpo; stage {stage} "
                          "estimates KL from pairs built during training, so it keeps the live reference")
    if not uses_reference(stage, dpo):
        if ref.model or ref.precompute:
            what = f"dpo.loss={dpo.loss}" if stage == "dpo" else f"stage {stage}"
            raise ConfigError(f"{what} uses no reference model; remove the reference settings")
        return
    if finetune.method == "lora" and finetune.lora.pissa_init and not ref.model:
        raise ConfigError("finetune.lora.pissa_init changes the base weights, so the base is no longer the "
                          "reference; set reference.model or remove pissa_init")
