"""The LLaMA-Factory flat dialect: one table mapping its keys onto our sections."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tuneforge.errors import ConfigError

Assignments = list[tuple[str, Any]]


def _to(path: str) -> Callable[[Any], Assignments]:
    return lambda value: [(path, value)]


def _to_all(*paths: str) -> Callable[[Any], Assignments]:
    return lambda value: [(path, value) for path in paths]


def _precision(name: str) -> Callable[[Any], Assignments]:
    return lambda value: [("train.precision", name)] if _truthy(value) else []


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in {"true", "1", "yes"})


def _flash_attn(value: Any) -> Assignments:
    table = {"auto": "auto", "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}
    if value not in table:
        raise ConfigError(f"flash_attn: {value!r} is not one of {', '.join(table)}")
    return [("model.attn_implementation", table[value])]


def _report_to(value: Any) -> Assignments:
    items = value if isinstance(value, list) else str(value).split(",")
    return [("train.report_to", [i.strip() for i in items if i.strip() and i.strip() not in {"none", "None"}])]


def _quant_method(value: Any) -> Assignments:
    if str(value).lower() not in {"bnb", "bitsandbytes"}:
        raise ConfigError(f"quantization_method: {value!r} is not supported yet; only bnb (bitsandbytes) is")
    return []


def _optim(value: Any) -> Assignments:
    names = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "sgd": "sgd",
             "adafactor": "adafactor", "adamw": "adamw", "adam": "adam", "rmsprop": "rmsprop"}
    if value not in names:
        raise ConfigError(f"optim: {value!r} is not supported yet; use one of {', '.join(sorted(names))}")
    return [("train.optimizer", names[value])]


def _do_train(value: Any) -> Assignments:
    if not _truthy(value):
        raise ConfigError("do_train: false asks for evaluation or prediction only, which tuneforge train does not do")
    return []


def _strategy(key: str, steps_path: str) -> Callable[[Any], Assignments]:
    def convert(value: Any) -> Assignments:
        if value == "steps":
            return []
        if value == "no":
            return [(steps_path, 0)] if key == "save_strategy" else []
        raise ConfigError(f"{key}: {value!r} is not supported yet; use 'steps' (with *_steps) or 'no'")

    return convert


def _not_gc(value: Any) -> Assignments:
    return [("train.gradient_checkpointing", not _truthy(value))]


def _save_only_model(value: Any) -> Assignments:
    """False (LF's default) is what checkpoints here always do: weights plus optimizer, schedule and RNG."""
    if _truthy(value):
        raise ConfigError("save_only_model: true is not supported: checkpoints keep the optimizer state so runs "
                          "resume exactly; remove the key (or set it to false)")
    return []


def _predict(value: Any) -> Assignments:
    """In a training config this asks for predictions at the end of training, as LLaMA-Factory does."""
    return [("eval.modes", ["predict"]), ("eval.after_training", True)] if _truthy(value) else []


def _task(value: Any) -> Assignments:
    """LF names a task with its split (mmlu_test, ceval_validation); the split is implied by the layout here."""
    name = str(value)
    for suffix in ("_test", "_validation", "_val"):
        name = name.removesuffix(suffix)
    return [("eval.task", name), ("eval.modes", ["choice"])]


def _export_device(value: Any) -> Assignments:
    if value not in ("cpu", "auto"):
        raise ConfigError(f"export_device: {value!r} is not supported; tuneforge merges on the CPU")
    return []


def _infer_backend(value: Any) -> Assignments:
    if value not in ("huggingface", "hf"):
        raise ConfigError(f"infer_backend: {value!r} is not available; tuneforge serves with huggingface (transformers)")
    return []


# LLaMA-Factory key -> converter returning (our dotted path, value) assignments.
MAPPING: dict[str, Callable[[Any], Assignments]] = {
    "stage": _to("stage"),
    "do_train": _do_train,
    "model_name_or_path": _to("model.path"),
    "adapter_name_or_path": _to("model.adapter_path"),
    "cache_dir": _to("model.cache_dir"),
    "model_revision": _to("model.revision"),
    "hf_hub_token": _to("model.token"),
    "trust_remote_code": _to("model.trust_remote_code"),
    "flash_attn": _flash_attn,
    "quantization_bit": _to("model.quantization_bit"),
    "quantization_method": _quant_method,
    "quantization_type": _to("model.quantization_type"),
    "double_quantization": _to("model.double_quantization"),
    "finetuning_type": _to("finetune.method"),
    "lora_rank": _to("finetune.lora.rank"),
    "lora_alpha": _to("finetune.lora.alpha"),
    "lora_dropout": _to("finetune.lora.dropout"),
    "lora_target": _to("finetune.lora.targets"),
    "additional_target": _to("finetune.lora.modules_to_save"),
    "use_rslora": _to("finetune.lora.rslora"),
    "use_dora": _to("finetune.lora.dora"),
    "pissa_init": _to("finetune.lora.pissa_init"),
    "create_new_adapter": _to("finetune.lora.create_new_adapter"),
    "freeze_trainable_layers": _to("finetune.freeze.trainable_layers"),
    "freeze_trainable_modules": _to("finetune.freeze.trainable_modules"),
    "freeze_extra_modules": _to("finetune.freeze.extra_modules"),
    "dataset": _to("data.dataset"),
    "eval_dataset": _to("data.eval_dataset"),
    "dataset_dir": _to("data.dataset_dir"),
    "template": _to("data.template"),
    "default_system": _to("data.default_system"),
    "enable_thinking": _to("data.enable_thinking"),
    "cutoff_len": _to("data.cutoff_len"),
    "max_samples": _to("data.max_samples"),
    "val_size": _to("data.val_size"),
    "mix_strategy": _to("data.mix_strategy"),
    "interleave_probs": _to("data.interleave_probs"),
    "train_on_prompt": _to("data.train_on_prompt"),
    "mask_history": _to("data.mask_history"),
    "packing": _to("data.packing"),
    "neat_packing": _to("data.packing"),
    "preprocessing_num_workers": _to("data.num_proc"),
    "overwrite_cache": _to("data.overwrite_cache"),
    "per_device_train_batch_size": _to("train.batch_size"),
    "per_device_eval_batch_size": _to("train.eval_batch_size"),
    "gradient_accumulation_steps": _to("train.gradient_accumulation_steps"),
    "learning_rate": _to("train.learning_rate"),
    "num_train_epochs": _to("train.epochs"),
    "max_steps": _to("train.max_steps"),
    "lr_scheduler_type": _to("train.scheduler"),
    "warmup_ratio": _to("train.warmup_ratio"),
    "warmup_steps": _to("train.warmup_steps"),
    "optim": _optim,
    "weight_decay": _to("train.weight_decay"),
    "max_grad_norm": _to("train.max_grad_norm"),
    "bf16": _precision("bf16"),
    "fp16": _precision("fp16"),
    "disable_gradient_checkpointing": _not_gc,
    "gradient_checkpointing": _to("train.gradient_checkpointing"),
    "seed": _to("train.seed"),
    "logging_steps": _to("train.logging_steps"),
    "save_steps": _to("train.save_steps"),
    "save_strategy": _strategy("save_strategy", "train.save_steps"),
    "save_total_limit": _to("train.save_total_limit"),
    "eval_steps": _to("train.eval_steps"),
    "eval_strategy": _strategy("eval_strategy", "train.eval_steps"),
    "evaluation_strategy": _strategy("evaluation_strategy", "train.eval_steps"),
    "resume_from_checkpoint": _to("train.resume_from_checkpoint"),
    "report_to": _report_to,
    "dataloader_num_workers": _to("train.dataloader_workers"),
    "group_by_length": _to("train.group_by_length"),
    "ddp_timeout": _to("train.ddp_timeout"),
    "output_dir": _to("output.dir"),
    "max_new_tokens": _to("generation.max_new_tokens"),
    "temperature": _to("generation.temperature"),
    "top_p": _to("generation.top_p"),
    "top_k": _to("generation.top_k"),
    "repetition_penalty": _to("generation.repetition_penalty"),
    "do_sample": _to("generation.do_sample"),
    "infer_backend": _infer_backend,
    "export_dir": _to("export.dir"),
    "do_predict": _predict,
    "predict_with_generate": _predict,
    "task": _task,
    "task_dir": _to("eval.task_dir"),
    "n_shot": _to("eval.n_shot"),
    "lang": _to("eval.lang"),
    "save_dir": _to("eval.dir"),
    "export_size": _to("export.size"),
    "export_device": _export_device,
    "overwrite_output_dir": _to("output.overwrite"),
    "plot_loss": _to("output.plot_loss"),
    "save_only_model": _save_only_model,
    "logging_dir": _to("output.logging_dir"),
    # preference stages (LF's RLHFArguments); pref_beta and pref_ftx serve dpo and kto alike
    "pref_beta": _to_all("dpo.beta", "kto.beta"),
    "pref_ftx": _to_all("dpo.ftx", "kto.ftx"),
    "pref_loss": _to("dpo.loss"),
    "dpo_label_smoothing": _to("dpo.label_smoothing"),
    "simpo_gamma": _to("dpo.simpo_gamma"),
    "ld_alpha": _to("dpo.ld_alpha"),
    "pref_bco_weight": _to("dpo.bco_weight"),
    "kto_chosen_weight": _to("kto.chosen_weight"),
    "kto_rejected_weight": _to("kto.rejected_weight"),
    "ref_model": _to("reference.model"),
    "ref_model_adapters": _to("reference.adapters"),
    "ref_model_quantization_bit": _to("reference.quantization_bit"),
    "precompute_ref_log_probs": _to("reference.precompute"),  # TRL's key; LF has none
}

# Keys accepted with no effect, each with the reason (printed, so nothing is silently ignored).
NO_EFFECT: dict[str, str] = {
    "use_fast_tokenizer": "tuneforge always uses the fast tokenizer",
    "include_num_input_tokens_seen": "tuneforge always logs tokens/s and trained tokens",
    "run_name": "the run is named by output.dir",
    "print_param_status": "the plan printed before training lists trainable parameters",
    "ddp_find_unused_parameters": "tuneforge configures DDP itself",
    "low_cpu_mem_usage": "transformers 5 always loads with low memory use",
}

# Keys of LLaMA-Factory that tuneforge does not support yet: an error names them instead of ignoring them.
UNSUPPORTED: dict[str, str] = {
    key: reason
    for reason, keys in {
        "multi-GPU back-ends other than DDP are not wired up yet": ["deepspeed", "fsdp", "fsdp_config"],
        "use `tuneforge eval` (eval.modes) for evaluation outside training": ["do_eval"],
        "export options beyond dir, size and device are not supported yet": [
            "export_legacy_format", "export_quantization_bit", "export_quantization_dataset", "export_hub_model_id",
        ],
        "the ppo stage is not built yet": [
            "reward_model", "reward_model_type", "reward_model_adapters", "reward_model_quantization_bit",
            "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target", "ppo_whiten_rewards",
        ],
        "not supported yet": [
            "tokenized_path", "streaming", "buffer_size", "rope_scaling", "shift_attn", "use_unsloth",
            "enable_liger_kernel", "use_galore", "use_badam", "use_apollo", "loraplus_lr_ratio",
            "pissa_convert", "pissa_iter", "resize_vocab", "split_special_tokens", "new_special_tokens",
            "upcast_layernorm", "upcast_lmhead_output", "adam_beta1", "adam_beta2",
            "adam_epsilon", "media_dir", "image_max_pixels", "video_max_pixels",
            "freeze_vision_tower", "tool_format", "use_llama_pro", "quantization_device_map", "pure_bf16",
            "data_seed", "vllm_maxlen", "moe_aux_loss_coef",
        ],
    }.items()
    for key in keys
}


def is_lf_key(key: str) -> bool:
    """True for any key this module knows from LLaMA-Factory (mapped, no-effect or unsupported)."""
    return key in MAPPING or key in NO_EFFECT or key in UNSUPPORTED


def map_key(key: str, value: Any) -> tuple[Assignments, str | None]:
    """Assignments in our dialect for one LF key, plus a notice for keys that have no effect."""
    if key in UNSUPPORTED:
        raise ConfigError(f"'{key}' (LLaMA-Factory) is not supported by tuneforge yet: {UNSUPPORTED[key]}. "
                          "Remove the key to continue.")
    if key in NO_EFFECT:
        return [], f"'{key}' has no effect: {NO_EFFECT[key]}"
    return MAPPING[key](value), None
