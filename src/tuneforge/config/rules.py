"""Cross-section rules: small named checks, each with one actionable message."""

from __future__ import annotations

from tuneforge.config.schema import (
    DataConfig,
    DPOConfig,
    FinetuneConfig,
    GRPOConfig,
    KTOConfig,
    ModelConfig,
    PPOConfig,
    ReferenceConfig,
    RewardModelConfig,
    RunConfig,
    SFTConfig,
    TrainConfig,
)
from tuneforge.errors import ConfigError

# plain update rules (train.optim.BASE_RULES builds them) plus the two that split parameters themselves
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "rmsprop", "adagrad", "adamw_8bit", "paged_adamw_8bit",
              "adam_mini", "muon")
GALORE_BASES = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor")


# Numeric settings and their allowed ranges: (low, high, low included, high included); None = unbounded. A key
# whose value is None (unset) is not checked. Cross-key rules follow in the functions below.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "train.logging_steps": (1, None, True, True),
    "model.vllm.max_len": (1, None, True, True),
    "model.vllm.gpu_util": (0, 1, False, True),
    "model.vllm.max_lora_rank": (1, None, True, True),
    "train.save_steps": (0, None, True, True),
    "train.save_total_limit": (1, None, True, True),
    "train.eval_steps": (0, None, True, True),
    "train.warmup_steps": (0, None, True, True),
    "train.weight_decay": (0, None, True, True),
    "train.max_grad_norm": (0, None, True, True),
    "train.adam_beta1": (0, 1, True, False),
    "train.adam_beta2": (0, 1, True, False),
    "train.adam_epsilon": (0, None, False, True),
    "train.forward_tokens": (0, None, True, True),
    "train.ddp_timeout": (1, None, True, True),
    "train.neftune_alpha": (0, None, False, True),
    "data.num_proc": (1, None, True, True),
    "generation.max_new_tokens": (1, None, True, True),
    "generation.temperature": (0, None, True, True),
    "generation.top_p": (0, 1, False, True),
    "generation.top_k": (0, None, True, True),
    "generation.repetition_penalty": (0, None, False, True),
    "export.size": (0, None, False, True),
    "eval.batch_size": (1, None, True, True),
    "eval.n_shot": (0, None, True, True),
}


def check_ranges(cfg: RunConfig) -> None:
    """Every RANGES setting within its range; the message names the key and the range."""
    for key, (low, high, low_in, high_in) in RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is None:
            continue
        below = low is not None and (value < low if low_in else value <= low)
        above = high is not None and (value > high if high_in else value >= high)
        if below or above:
            lo = "" if low is None else f"{'[' if low_in else '('}{low:g}"
            hi = "inf)" if high is None else f"{high:g}{']' if high_in else ')'}"
            raise ConfigError(f"{key} must be in {lo or '(-inf'}, {hi}, got {value:g}")


def validate(cfg: RunConfig, source: str) -> None:
    """Run every rule; the first broken one raises ConfigError prefixed with the config's source."""
    try:
        check_ranges(cfg)
        check_quantization(cfg.model, cfg.finetune)
        check_finetune(cfg.finetune)
        check_data(cfg.data)
        check_train(cfg.train)
        check_optimizer(cfg.train, cfg.finetune)
        check_best_model(cfg.train, cfg.data)
        check_stage_data(cfg.stage, cfg.data)
        if cfg.stage != "grpo":  # pref_beta also sets grpo.beta, whose 0 (no KL) is no valid dpo/kto beta
            check_dpo(cfg.dpo)
            check_kto(cfg.kto)
        check_grpo(cfg.grpo, cfg.stage)
        check_ppo(cfg.ppo, cfg.reward_model, cfg.stage, cfg.finetune)
        check_sft(cfg.sft, cfg.stage)
        check_reference(cfg.reference, cfg.stage, cfg.dpo, cfg.finetune, cfg.sft, cfg.grpo)
        check_infer_backend(cfg)
        if cfg.train.fsdp.enabled:
            import torch

            from tuneforge.train.distributed import check_fsdp

            check_fsdp(cfg, torch.cuda.is_available() and cfg.train.device != "cpu")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def check_vllm_modes(modes: list[str], when: str = "") -> None:
    """vLLM gives no logits: eval modes that score with them (all but predict) need infer_backend huggingface."""
    if scored := [m for m in modes if m != "predict"]:
        raise ConfigError(f"eval.modes: {', '.join(scored)}{when} score with the model's own logits, which vLLM does "
                          "not give; keep predict only, or use model.infer_backend: huggingface")


def check_infer_backend(cfg: RunConfig) -> None:
    """vLLM generates only: evaluation after training that scores with logits (loss, choice), or a reward model
    (stage rm), needs infer_backend huggingface; said at load, not after the training they would follow."""
    if cfg.model.infer_backend != "vllm":
        return
    if cfg.eval.after_training:
        check_vllm_modes(cfg.eval.modes, " after training")
    if cfg.stage == "rm":
        raise ConfigError("model.infer_backend: vllm serves generation; a reward model (stage rm) scores with its "
                          "value head: use model.infer_backend: huggingface")


def check_quantization(model: ModelConfig, finetune: FinetuneConfig) -> None:
    """Quantized bases train only through adapters (QLoRA)."""
    if model.quantization_bit is None:
        return
    if model.quantization_bit not in (4, 8):
        raise ConfigError(f"model.quantization_bit: {model.quantization_bit} is not supported; use 4 or 8")
    if finetune.method not in ("lora", "oft"):
        raise ConfigError(
            f"model.quantization_bit is set with finetune.method={finetune.method}: quantized weights cannot be "
            "trained directly. Use finetune.method=lora (QLoRA) or oft, or remove quantization_bit."
        )
    if finetune.lora.pissa_init:
        raise ConfigError("finetune.lora.pissa_init cannot initialise from quantized weights; "
                          "remove model.quantization_bit or pissa_init")
    if model.resize_vocab or model.add_tokens or model.add_special_tokens:
        raise ConfigError("the embeddings of a quantized model cannot be resized (model.resize_vocab, add_tokens, "
                          "add_special_tokens); remove model.quantization_bit or the new tokens")


def check_finetune(finetune: FinetuneConfig) -> None:
    """Ranks and layer counts must be usable."""
    if finetune.lora.rank < 1:
        raise ConfigError(f"finetune.lora.rank must be >= 1, got {finetune.lora.rank}")
    if not 0 <= finetune.lora.dropout < 1:
        raise ConfigError(f"finetune.lora.dropout must be in [0, 1), got {finetune.lora.dropout}")
    if finetune.method == "freeze" and finetune.freeze.trainable_layers == 0:
        raise ConfigError("finetune.freeze.trainable_layers is 0, so nothing would train; "
                          "use a positive count (last layers) or a negative one (first layers)")
    if finetune.lora.pissa_convert and finetune.lora.dora:
        raise ConfigError("finetune.lora.pissa_convert rewrites A and B only, so a DoRA adapter's magnitudes would "
                          "not match; remove pissa_convert or dora")
    if finetune.lora.pissa_iter < -1:
        raise ConfigError(f"finetune.lora.pissa_iter must be -1 (full SVD) or >= 0, got {finetune.lora.pissa_iter}")
    oft = finetune.oft
    if (oft.rank != 0) == (oft.block_size != 0) or oft.rank < 0 or oft.block_size < 0:
        raise ConfigError(f"finetune.oft: give exactly one of rank ({oft.rank}) and block_size ({oft.block_size}) "
                          "as a positive number and set the other to 0 (rank x block_size = the layer's input size)")
    if not 0 <= oft.dropout < 1:
        raise ConfigError(f"finetune.oft.dropout must be in [0, 1), got {oft.dropout}")
    if finetune.llama_pro and (finetune.method == "full" or finetune.freeze.trainable_layers < 1):
        raise ConfigError("finetune.llama_pro (use_llama_pro) trains the blocks added by `tuneforge expand`: use it "
                          "with finetune.method freeze, lora or oft and freeze.trainable_layers = the number added")


def check_data(data: DataConfig) -> None:
    """Lengths, split sizes and mixing probabilities must be consistent."""
    if data.cutoff_len < 8:
        raise ConfigError(f"data.cutoff_len must be at least 8 tokens, got {data.cutoff_len}")
    if data.val_size < 0 or (data.val_size >= 1 and not float(data.val_size).is_integer()):
        raise ConfigError(f"data.val_size must be a fraction in [0, 1) or a whole row count, got {data.val_size}")
    if data.max_samples is not None and data.max_samples < 1:
        raise ConfigError(f"data.max_samples must be >= 1, got {data.max_samples}")
    if data.val_size > 0 and data.eval_dataset:
        raise ConfigError(f"data.val_size ({data.val_size:g}) and data.eval_dataset are both set: validation rows "
                          "come from one of them (LLaMA-Factory refuses this too); remove val_size to evaluate on "
                          "eval_dataset, or remove eval_dataset to split val_size rows off the training data")
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
    from tuneforge.train.tracking import check_reporters

    check_reporters(train.report_to)
    if train.compile and (train.deepspeed or train.fsdp.enabled):
        raise ConfigError("train.compile (torch_compile) is for single-process and DDP runs; it is not combined "
                          "with DeepSpeed or FSDP here: drop one of them")


def check_optimizer(train: TrainConfig, finetune: FinetuneConfig) -> None:
    """LLaMA-Factory's optimizer rules: one of GaLore/APOLLO/BAdam, none with LoRA; LoRA+ only with LoRA."""
    methods = [k for k in ("galore", "apollo", "badam") if getattr(train, k).enabled]
    if len(methods) > 1:
        raise ConfigError(f"train.{methods[0]} and train.{methods[1]} cannot be used together; enable one of them")
    if methods and finetune.method == "lora":
        raise ConfigError(f"train.{methods[0]} trains full weights and cannot be used with LoRA; set "
                          "finetune.method=full (or freeze), or remove it")
    if finetune.lora.plus_lr_ratio is not None:
        if finetune.method != "lora":
            raise ConfigError(f"finetune.lora.plus_lr_ratio (loraplus_lr_ratio) is for LoRA only, not "
                              f"finetune.method={finetune.method}; remove it")
        if finetune.lora.plus_lr_ratio <= 0:
            raise ConfigError(f"finetune.lora.plus_lr_ratio must be > 0, got {finetune.lora.plus_lr_ratio}")
    if train.galore.enabled and train.optimizer not in GALORE_BASES:
        raise ConfigError(f"train.galore runs on train.optimizer {', '.join(GALORE_BASES)}, not '{train.optimizer}'")
    if train.apollo.enabled and train.optimizer != "adamw":
        raise ConfigError(f"train.apollo runs on train.optimizer adamw, not '{train.optimizer}'")
    for key in ("galore", "apollo"):
        section = getattr(train, key)
        if section.enabled and (section.rank < 1 or section.update_interval < 1):
            raise ConfigError(f"train.{key}.rank and update_interval must be >= 1")
        if section.enabled and section.layerwise and train.gradient_accumulation_steps != 1:
            raise ConfigError(f"train.{key}.layerwise steps each weight during the backward pass, so it cannot "
                              "accumulate gradients: set train.gradient_accumulation_steps=1 or layerwise=false")
        if section.enabled and section.layerwise and train.forward_tokens:
            raise ConfigError(f"train.{key}.layerwise needs one backward pass per step; remove train.forward_tokens")
        if section.enabled and section.layerwise and train.precision == "fp16":
            raise ConfigError(f"train.{key}.layerwise cannot use fp16 loss scaling; use bf16 or fp32")
    check_badam(train, finetune)


def check_badam(train: TrainConfig, finetune: FinetuneConfig) -> None:
    """BAdam trains every weight block by block (full finetuning), in one of two modes."""
    b = train.badam
    if not b.enabled:
        return
    if finetune.method != "full":
        raise ConfigError(f"train.badam switches which decoder layer trains, so it needs finetune.method=full, "
                          f"not {finetune.method}")
    if b.mode == "layer" and train.optimizer in ("adam_mini", "muon"):
        raise ConfigError(f"train.badam updates its block with a plain optimizer; train.optimizer={train.optimizer} "
                          "is a method of its own")
    if b.mode == "ratio":
        if train.optimizer not in ("adamw", "adam"):
            raise ConfigError("train.badam.mode=ratio runs its own sparse Adam; set train.optimizer=adamw")
        if not 0 < b.update_ratio <= 1:
            raise ConfigError(f"train.badam.update_ratio must be in (0, 1], got {b.update_ratio}")
        if train.precision == "fp16":
            raise ConfigError("train.badam.mode=ratio makes sparse gradients, which fp16 loss scaling cannot take; "
                              "use bf16 or fp32")
    if b.switch_interval == 0 or b.switch_interval < -1:
        raise ConfigError(f"train.badam.switch_interval must be >= 1, or -1 to never switch; got {b.switch_interval}")


def check_best_model(train: TrainConfig, data: DataConfig) -> None:
    """Early stopping and load_best_model_at_end need evaluations, and the best one must have saved weights."""
    if not (train.early_stopping_steps is not None or train.load_best_model_at_end) or not train.enabled:
        return
    key = "early_stopping_steps" if train.early_stopping_steps is not None else "load_best_model_at_end"
    if train.early_stopping_steps is not None and train.early_stopping_steps < 1:
        raise ConfigError(f"train.early_stopping_steps must be >= 1 evaluations, got {train.early_stopping_steps}")
    if not data.eval_dataset and data.val_size <= 0:
        raise ConfigError(f"train.{key} compares evaluations, so it needs validation data: set data.eval_dataset "
                          "or data.val_size")
    eval_every = eval_interval(train)
    if not eval_every:
        raise ConfigError(f"train.{key} needs evaluations during training: set train.eval_steps")
    if train.load_best_model_at_end and (not train.save_steps or train.save_steps % eval_every):
        raise ConfigError(f"train.load_best_model_at_end keeps the best evaluated checkpoint, so train.save_steps "
                          f"({train.save_steps}) must be a multiple of train.eval_steps ({eval_every})")


def eval_interval(train: TrainConfig) -> int:
    """Steps between evaluations during training: eval_steps, else save_steps; 0 means none."""
    return train.save_steps if train.eval_steps is None else train.eval_steps


PREFERENCE_STAGES = ("rm", "dpo", "kto")
NO_REFERENCE_LOSSES = ("orpo", "simpo")


def check_stage_data(stage: str, data: DataConfig) -> None:
    """Packing exists for pt and sft; neat packing and prompt-side masking for sft only (as in LLaMA-Factory)."""
    if stage == "sft":
        return
    keys = ("neat_packing", "train_on_prompt", "mask_history") + \
        (("packing",) if stage in (*PREFERENCE_STAGES, "grpo", "ppo") else ())
    for key in keys:
        if getattr(data, key):
            what = "trains on whole texts" if stage == "pt" else "trains on whole answers"
            raise ConfigError(f"data.{key} is for the sft stage; stage {stage} {what}. Remove data.{key}")


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


def check_grpo(grpo: GRPOConfig, stage: str) -> None:
    """Groups of at least two, usable clipping and KL, at least one reward function with at most one weight each."""
    if stage == "grpo" and not grpo.reward_funcs:
        raise ConfigError("stage grpo needs at least one reward function: set grpo.reward_funcs (reward_funcs), "
                          "e.g. ['rewards.py:my_reward'] or a built-in name")
    if grpo.num_generations < 2:
        raise ConfigError(f"grpo.num_generations (num_generations) must be >= 2 (advantages compare completions of "
                          f"one prompt), got {grpo.num_generations}")
    if grpo.epsilon <= 0 or (grpo.epsilon_high is not None and grpo.epsilon_high <= 0):
        raise ConfigError("grpo.epsilon and grpo.epsilon_high (grpo_epsilon, grpo_epsilon_high) must be > 0")
    if grpo.beta < 0:
        raise ConfigError(f"grpo.beta (pref_beta) must be >= 0 (0: no KL term, no reference model), got {grpo.beta}")
    if grpo.num_iterations < 1 or grpo.max_completion_length < 1:
        raise ConfigError("grpo.num_iterations and grpo.max_completion_length must be >= 1")
    if grpo.reward_weights and len(grpo.reward_weights) != len(grpo.reward_funcs):
        raise ConfigError(f"grpo.reward_weights (reward_weights) has {len(grpo.reward_weights)} weights for "
                          f"{len(grpo.reward_funcs)} reward functions; give one weight per function or none")
    if grpo.completions_logged < 0 or (grpo.completions_log_steps is not None and grpo.completions_log_steps < 1):
        raise ConfigError("grpo.completions_logged must be >= 0 and grpo.completions_log_steps >= 1")


def check_ppo(ppo: PPOConfig, reward: RewardModelConfig, stage: str, finetune: FinetuneConfig) -> None:
    """A reward model of a usable type (lora only on a LoRA policy, api an http(s) URL) and usable PPO settings."""
    if reward.quantization_bit not in (None, 4, 8):
        raise ConfigError(f"reward_model.quantization_bit: {reward.quantization_bit} is not supported; use 4 or 8")
    if (reward.adapters or reward.quantization_bit) and reward.type != "full":
        raise ConfigError("reward_model.adapters / reward_model.quantization_bit apply to a full reward model; set "
                          "reward_model.type=full (reward_model_type: full) or remove them")
    if ppo.epochs < 1 or ppo.buffer_size < 1 or ppo.horizon < 1:
        raise ConfigError("ppo.epochs, ppo.buffer_size and ppo.horizon (ppo_epochs, ppo_buffer_size) must be >= 1")
    if ppo.target <= 0 or ppo.cliprange <= 0 or ppo.cliprange_value <= 0 or ppo.ratio_threshold <= 0:
        raise ConfigError("ppo.target (ppo_target), ppo.cliprange, ppo.cliprange_value and ppo.ratio_threshold "
                          "must be > 0")
    if ppo.init_kl_coef < 0 or ppo.vf_coef < 0 or not 0 <= ppo.gamma <= 1 or not 0 <= ppo.lam <= 1:
        raise ConfigError("ppo.init_kl_coef and ppo.vf_coef must be >= 0, ppo.gamma and ppo.lam in [0, 1]")
    if stage != "ppo":
        return
    if not reward.path:
        raise ConfigError("stage ppo needs a reward model: set reward_model.path (reward_model) to an rm adapter or "
                          "run folder, a model folder with a value head (reward_model.type=full) or a score URL "
                          "(reward_model.type=api)")
    if reward.type == "lora" and finetune.method != "lora":
        raise ConfigError(f"reward_model.type=lora loads the reward adapter on the policy's base, which needs "
                          f"finetune.method=lora (not {finetune.method}); use reward_model.type=full instead")
    is_url = reward.path.startswith(("http://", "https://"))
    if reward.type == "api" and not is_url:
        raise ConfigError(f"reward_model.type=api needs an http(s) URL in reward_model.path (e.g. "
                          f"http://127.0.0.1:8000/v1/score/evaluation), got {reward.path!r}")
    if reward.type != "api" and is_url:
        raise ConfigError(f"reward_model.path is a URL ({reward.path}); set reward_model.type=api to score through it")


def check_sft(sft: SFTConfig, stage: str) -> None:
    """The reweighted token losses belong to the sft stage (as in LLaMA-Factory); alphas must be usable."""
    if sft.loss != "ce" and stage != "sft":
        raise ConfigError(f"sft.loss={sft.loss} (use_{sft.loss}_loss) applies to stage sft, not {stage}; remove it")
    if sft.eaft_alpha < 0 or sft.asft_alpha < 0:
        raise ConfigError("sft.eaft_alpha and sft.asft_alpha must be >= 0")


def uses_reference(stage: str, dpo: DPOConfig, sft: SFTConfig | None = None, grpo: GRPOConfig | None = None) -> bool:
    """dpo (except orpo and simpo), kto, ppo, sft's asft loss and grpo with a KL term compare the policy with a
    reference."""
    return stage in ("kto", "ppo") or (stage == "dpo" and dpo.loss not in NO_REFERENCE_LOSSES) or \
        (stage == "sft" and sft is not None and sft.loss == "asft") or \
        (stage == "grpo" and grpo is not None and grpo.beta > 0)


def check_reference(ref: ReferenceConfig, stage: str, dpo: DPOConfig, finetune: FinetuneConfig,
                    sft: SFTConfig | None = None, grpo: GRPOConfig | None = None) -> None:
    """Reference settings must be used and loadable; PiSSA moves the base, so the adapter-off reference breaks."""
    if ref.quantization_bit not in (None, 4, 8):
        raise ConfigError(f"reference.quantization_bit: {ref.quantization_bit} is not supported; use 4 or 8")
    if (ref.adapters or ref.quantization_bit) and not ref.model:
        raise ConfigError("reference.adapters / reference.quantization_bit apply to a separate reference model; "
                          "set reference.model (LLaMA-Factory: ref_model) as well")
    if ref.precompute and stage != "dpo":
        raise ConfigError(f"reference.precompute (precompute_ref_log_probs) is available for stage dpo; stage {stage} "
                          "estimates KL from pairs built during training, so it keeps the live reference")
    if not uses_reference(stage, dpo, sft, grpo):
        if ref.model or ref.precompute:
            what = f"dpo.loss={dpo.loss}" if stage == "dpo" else f"stage {stage}"
            raise ConfigError(f"{what} uses no reference model; remove the reference settings")
        return
    if finetune.method == "lora" and finetune.lora.pissa_init and not ref.model:
        raise ConfigError("finetune.lora.pissa_init changes the base weights, so the base is no longer the "
                          "reference; set reference.model or remove pissa_init")
