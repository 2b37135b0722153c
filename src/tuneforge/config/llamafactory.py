"""The LLaMA-Factory flat dialect: one table mapping its keys onto our sections."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tuneforge.errors import ConfigError

Assignments = list[tuple[str, Any]]


def _to(path: str) -> Callable[[Any], Assignments]:
    return _to_all(path)


def _to_all(*paths: str) -> Callable[[Any], Assignments]:
    def convert(value: Any) -> Assignments:
        return [(path, value) for path in paths]

    convert.target = ", ".join(f"`{p}`" for p in paths)  # type: ignore[attr-defined]
    return convert


def _when_true(path: str, on: Any) -> Callable[[Any], Assignments]:
    def convert(value: Any) -> Assignments:
        return [(path, on)] if _truthy(value) else []

    convert.target = f"`{path}: {on}` when true"  # type: ignore[attr-defined]
    return convert


def _precision(name: str) -> Callable[[Any], Assignments]:
    return _when_true("train.precision", name)


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in {"true", "1", "yes"})


def _sft_loss(name: str) -> Callable[[Any], Assignments]:
    return _when_true("sft.loss", name)


def _flash_attn(value: Any) -> Assignments:
    """`model.attn_implementation`: auto, disabled (eager), sdpa, fa2 (flash_attention_2)."""
    table = {"auto": "auto", "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}
    if value not in table:
        raise ConfigError(f"flash_attn: {value!r} is not one of {', '.join(table)}")
    return [("model.attn_implementation", table[value])]


def _report_to(value: Any) -> Assignments:
    """`train.report_to` (a list; none means no extra logger)."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [("train.report_to", [i.strip() for i in items if i.strip() and i.strip() not in {"none", "None"}])]


def _quant_method(value: Any) -> Assignments:
    """bnb (bitsandbytes, used by `model.quantization_bit`); other methods are refused."""
    if str(value).lower() not in {"bnb", "bitsandbytes"}:
        raise ConfigError(f"quantization_method: {value!r} is not supported yet; only bnb (bitsandbytes) is")
    return []


FSDP_OPTIONS = {"full_shard": [("train.fsdp.reshard_after_forward", True)],
                "shard_grad_op": [("train.fsdp.reshard_after_forward", False)],
                "offload": [("train.fsdp.offload_params", True)], "auto_wrap": []}


def _fsdp(value: Any) -> Assignments:
    """`train.fsdp` (transformers' fsdp options: full_shard or shard_grad_op, with offload and auto_wrap)"""
    if value in (None, "", False, []) or isinstance(value, str) and value.lower() in {"none", "false"}:
        return []
    items = value if isinstance(value, list) else str(value).split()
    for item in items:
        if item not in FSDP_OPTIONS:
            raise ConfigError(f"fsdp: option {item!r} is not supported; use full_shard or shard_grad_op, optionally "
                              "with offload and auto_wrap (e.g. fsdp: full_shard auto_wrap)")
    return [("train.fsdp.enabled", True), *(a for item in items for a in FSDP_OPTIONS[item])]


FSDP_CONFIG_INERT = ("backward_prefetch", "forward_prefetch", "limit_all_gathers", "use_orig_params",
                     "sync_module_states", "cpu_ram_efficient_loading", "state_dict_type", "min_num_params")


def _fsdp_config(value: Any) -> Assignments:
    """`train.fsdp` settings from transformers' fsdp_config (a mapping or a JSON file): version 1 or 2 (both run as
    FSDP2), reshard_after_forward, offload_params, transformer_layer_cls_to_wrap, activation_checkpointing"""
    import json
    from pathlib import Path

    if value in (None, "", {}):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(Path(value).read_text(encoding="utf-8-sig"))
        except OSError:
            raise ConfigError(f"fsdp_config: {value} not found; give a mapping or a JSON file") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"fsdp_config: {value} is not valid JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"fsdp_config must be a mapping or a JSON file, got {type(value).__name__}")
    out: Assignments = []
    for raw, item in value.items():
        key = raw[5:] if raw.startswith("fsdp_") else raw
        if key == "version":
            if item not in (1, 2, "1", "2"):
                raise ConfigError(f"fsdp_config: {raw} {item!r} does not exist; use 1 or 2 (both run as FSDP2)")
        elif key == "reshard_after_forward":
            table = {True: True, False: False, "FULL_SHARD": True, "SHARD_GRAD_OP": False, "true": True,
                     "false": False}
            if item not in table:
                raise ConfigError(f"fsdp_config: {raw} {item!r} is not supported; use true or false")
            out.append(("train.fsdp.reshard_after_forward", table[item]))
        elif key == "offload_params":
            out.append(("train.fsdp.offload_params", _truthy(item)))
        elif key == "transformer_layer_cls_to_wrap":
            out.append(("train.fsdp.layer_classes", item if isinstance(item, list) else
                        [c.strip() for c in str(item).split(",") if c.strip()]))
        elif key == "auto_wrap_policy":
            if str(item).upper() != "TRANSFORMER_BASED_WRAP":
                raise ConfigError(f"fsdp_config: {raw} {item!r} is not supported; tuneforge shards per decoder "
                                  "layer (TRANSFORMER_BASED_WRAP)")
        elif key == "activation_checkpointing":
            if _truthy(item):
                out.append(("train.gradient_checkpointing", True))
        elif key not in FSDP_CONFIG_INERT:
            raise ConfigError(f"fsdp_config: {raw} is not a setting tuneforge knows; the supported ones are "
                              "version, reshard_after_forward, offload_params, transformer_layer_cls_to_wrap, "
                              "auto_wrap_policy, activation_checkpointing (and prefetch / loading flags, which "
                              "change nothing here)")
    return out


OPTIM_NAMES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
               "adam": "adam", "sgd": "sgd", "adafactor": "adafactor", "rmsprop": "rmsprop", "adagrad": "adagrad",
               "adamw_8bit": "adamw_8bit", "adamw_bnb_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}


def _optim(value: Any) -> Assignments:
    """train.optimizer (transformers' OptimizerNames that tuneforge builds)"""
    if value not in OPTIM_NAMES:
        raise ConfigError(f"optim: {value!r} is not supported; use one of {', '.join(OPTIM_NAMES)} (GaLore, "
                          "APOLLO, BAdam, Adam-mini and Muon through use_galore, use_apollo, use_badam, "
                          "use_adam_mini, use_muon)")
    return [("train.optimizer", OPTIM_NAMES[value])]


def _use_optimizer(name: str) -> Callable[[Any], Assignments]:
    def convert(value: Any) -> Assignments:
        return [("train.optimizer", name)] if _truthy(value) else []

    convert.target = f"`train.optimizer: {name}` when true"  # type: ignore[attr-defined]
    return convert


# use_* optimizer flags win over `optim` wherever they stand in the file, as in LLaMA-Factory (adam_mini first).
OVERRIDING = ("use_muon", "use_adam_mini")


def precedence_order(items: Any) -> list[tuple[str, Any]]:
    """(key, value) pairs with the OVERRIDING keys moved last, in OVERRIDING's order."""
    items = list(items)
    late = sorted((kv for kv in items if kv[0] in OVERRIDING), key=lambda kv: OVERRIDING.index(kv[0]))
    return [kv for kv in items if kv[0] not in OVERRIDING] + late


def _do_train(value: Any) -> Assignments:
    """train.enabled; false (with do_eval / do_predict) makes `tuneforge train` only evaluate the given model."""
    return [("train.enabled", _truthy(value))]


def _strategy(key: str, steps_path: str) -> Callable[[Any], Assignments]:
    def convert(value: Any) -> Assignments:
        if value == "steps":
            return []
        if value == "no":
            return [(steps_path, 0)]
        raise ConfigError(f"{key}: {value!r} is not supported yet; use 'steps' (with *_steps) or 'no'")

    convert.target = f"steps: `{steps_path}` as given; no: `{steps_path}: 0`"  # type: ignore[attr-defined]
    return convert


def _pure_bf16(value: Any) -> Assignments:
    """bf16 weights and bf16 compute, no fp32 master copy (LLaMA-Factory's pure_bf16)."""
    return [("model.dtype", "bf16"), ("train.precision", "bf16")] if _truthy(value) else []


def _not_gc(value: Any) -> Assignments:
    """`train.gradient_checkpointing` (its negation)."""
    return [("train.gradient_checkpointing", not _truthy(value))]


def _save_only_model(value: Any) -> Assignments:
    """False (LF's default) is what checkpoints here always do: weights plus optimizer, schedule and RNG."""
    if _truthy(value):
        raise ConfigError("save_only_model: true is not supported: checkpoints keep the optimizer state so runs "
                          "resume exactly; remove the key (or set it to false)")
    return []


def _evaluate_after(mode: str) -> Callable[[Any], Assignments]:
    """do_eval (loss) / do_predict (predict): that evaluation at the end of `tuneforge train`; as in LLaMA-Factory,
    without do_train: true nothing is trained first."""

    def convert(value: Any) -> Assignments:
        if not _truthy(value):
            return []
        return [("eval.modes+", [mode]), ("eval.after_training", True), ("train.enabled?", False)]

    convert.target = f"`eval.modes` + {mode}, `eval.after_training`"  # type: ignore[attr-defined]
    return convert


def _task(value: Any) -> Assignments:
    """LF names a task with its split (mmlu_test, ceval_validation); the split is implied by the layout here."""
    name = str(value)
    for suffix in ("_test", "_validation", "_val"):
        name = name.removesuffix(suffix)
    return [("eval.task", name), ("eval.modes+", ["choice"])]


def _export_device(value: Any) -> Assignments:
    """cpu or auto (exports merge on the CPU); others refused."""
    if value not in ("cpu", "auto"):
        raise ConfigError(f"export_device: {value!r} is not supported; tuneforge merges on the CPU")
    return []


def _infer_backend(value: Any) -> Assignments:
    """huggingface (transformers generation) or vllm; sglang / ktransformers refused."""
    if value in ("huggingface", "hf"):
        return [("model.infer_backend", "huggingface")]
    if value == "vllm":
        return [("model.infer_backend", "vllm")]
    raise ConfigError(f"infer_backend: {value!r} is not available; choose huggingface (transformers) or vllm")


def _vllm_config(value: Any) -> Assignments:
    """A dict of vLLM engine arguments, or its JSON text (as LLaMA-Factory takes it on the command line)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(f"vllm_config: not valid JSON ({err.msg}); give engine arguments as "
                              "'{\"max_num_seqs\": 64}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"vllm_config: give a mapping of vLLM engine arguments, got {value!r}")
    return [("model.vllm.engine_args", value)]


def _special_tokens_config(value: Any) -> Assignments:
    """A YAML file {token: description}: its tokens are added as special tokens (LF's default noise_init uses
    the descriptions for nothing else)."""
    if value in (None, ""):
        return []
    from pathlib import Path

    import yaml

    try:
        tokens = yaml.safe_load(Path(str(value)).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"new_special_tokens_config: cannot read {value}: {err}") from None
    if not isinstance(tokens, dict):
        raise ConfigError(f"new_special_tokens_config: {value} must map each new token to its description")
    return [("model.add_special_tokens", [str(t) for t in tokens])]


def _init_special_tokens(value: Any) -> Assignments:
    """noise_init (new embeddings: mean plus noise, as `model.add_special_tokens` does); desc_init refused."""
    if value not in (None, "noise_init"):
        raise ConfigError(f"init_special_tokens: {value!r} is not supported; new token embeddings start at the "
                          "mean embedding plus noise (noise_init, the default)")
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
    "additional_target": _to_all("finetune.lora.modules_to_save", "finetune.oft.modules_to_save"),
    "use_rslora": _to("finetune.lora.rslora"),
    "use_dora": _to("finetune.lora.dora"),
    "pissa_init": _to("finetune.lora.pissa_init"),
    "create_new_adapter": _to_all("finetune.lora.create_new_adapter", "finetune.oft.create_new_adapter"),
    "pissa_iter": _to("finetune.lora.pissa_iter"),
    "pissa_convert": _to("finetune.lora.pissa_convert"),
    "oft_rank": _to("finetune.oft.rank"),
    "oft_block_size": _to("finetune.oft.block_size"),
    "oft_target": _to("finetune.oft.targets"),
    "module_dropout": _to("finetune.oft.dropout"),
    "use_llama_pro": _to("finetune.llama_pro"),
    "use_dft_loss": _sft_loss("dft"),
    "use_eaft_loss": _sft_loss("eaft"),
    "use_asft_loss": _sft_loss("asft"),
    "eaft_alpha": _to("sft.eaft_alpha"),
    "asft_alpha": _to("sft.asft_alpha"),
    "neftune_noise_alpha": _to("train.neftune_alpha"),  # the HF Trainer's key
    "freeze_trainable_layers": _to("finetune.freeze.trainable_layers"),
    "freeze_trainable_modules": _to("finetune.freeze.trainable_modules"),
    "freeze_extra_modules": _to("finetune.freeze.extra_modules"),
    "dataset": _to("data.dataset"),
    "eval_dataset": _to("data.eval_dataset"),
    "dataset_dir": _to("data.dataset_dir"),
    "template": _to("data.template"),
    "default_system": _to("data.default_system"),
    "enable_thinking": _to("data.enable_thinking"),
    "tool_format": _to("data.tool_format"),
    "cutoff_len": _to("data.cutoff_len"),
    "max_samples": _to("data.max_samples"),
    "val_size": _to("data.val_size"),
    "mix_strategy": _to("data.mix_strategy"),
    "interleave_probs": _to("data.interleave_probs"),
    "train_on_prompt": _to("data.train_on_prompt"),
    "mask_history": _to("data.mask_history"),
    "packing": _to("data.packing"),
    "neat_packing": _to("data.neat_packing"),
    "tokenized_path": _to("data.tokenized_path"),
    "disable_shuffling": _when_true("train.shuffle", False),
    "data_seed": _to("train.data_seed"),  # the HF Trainer's key
    "use_cpu": _when_true("train.device", "cpu"),  # the HF Trainer's key
    "rope_scaling": _to("model.rope_scaling"),
    "resize_vocab": _to("model.resize_vocab"),
    "add_tokens": _to("model.add_tokens"),
    "add_special_tokens": _to("model.add_special_tokens"),
    "new_special_tokens": _to("model.add_special_tokens"),  # LLaMA-Factory's name before 0.9.4
    "new_special_tokens_config": _special_tokens_config,
    "init_special_tokens": _init_special_tokens,
    "split_special_tokens": _to("model.split_special_tokens"),
    "preprocessing_num_workers": _to("data.num_proc"),
    "overwrite_cache": _to("data.overwrite_cache"),
    "per_device_train_batch_size": _to("train.batch_size"),
    "per_device_eval_batch_size": _to_all("train.eval_batch_size", "eval.batch_size"),
    "gradient_accumulation_steps": _to("train.gradient_accumulation_steps"),
    "learning_rate": _to("train.learning_rate"),
    "num_train_epochs": _to("train.epochs"),
    "max_steps": _to("train.max_steps"),
    "lr_scheduler_type": _to("train.scheduler"),
    "warmup_ratio": _to("train.warmup_ratio"),
    "warmup_steps": _to("train.warmup_steps"),
    "optim": _optim,
    "adam_beta1": _to("train.adam_beta1"),
    "adam_beta2": _to("train.adam_beta2"),
    "adam_epsilon": _to("train.adam_epsilon"),
    "loraplus_lr_ratio": _to("finetune.lora.plus_lr_ratio"),
    "loraplus_lr_embedding": _to("finetune.lora.plus_lr_embedding"),
    "use_adam_mini": _use_optimizer("adam_mini"),
    "use_muon": _use_optimizer("muon"),
    "use_galore": _to("train.galore.enabled"),
    "galore_target": _to("train.galore.target"),
    "galore_rank": _to("train.galore.rank"),
    "galore_update_interval": _to("train.galore.update_interval"),
    "galore_scale": _to("train.galore.scale"),
    "galore_proj_type": _to("train.galore.proj_type"),
    "galore_layerwise": _to("train.galore.layerwise"),
    "use_apollo": _to("train.apollo.enabled"),
    "apollo_target": _to("train.apollo.target"),
    "apollo_rank": _to("train.apollo.rank"),
    "apollo_update_interval": _to("train.apollo.update_interval"),
    "apollo_scale": _to("train.apollo.scale"),
    "apollo_proj": _to("train.apollo.proj"),
    "apollo_proj_type": _to("train.apollo.proj_type"),
    "apollo_scale_type": _to("train.apollo.scale_type"),
    "apollo_layerwise": _to("train.apollo.layerwise"),
    "apollo_scale_front": _to("train.apollo.scale_front"),
    "use_badam": _to("train.badam.enabled"),
    "badam_mode": _to("train.badam.mode"),
    "badam_start_block": _to("train.badam.start_block"),
    "badam_switch_mode": _to("train.badam.switch_mode"),
    "badam_switch_interval": _to("train.badam.switch_interval"),
    "badam_update_ratio": _to("train.badam.update_ratio"),
    "badam_mask_mode": _to("train.badam.mask_mode"),
    "badam_verbose": _to("train.badam.verbose"),
    "weight_decay": _to("train.weight_decay"),
    "max_grad_norm": _to("train.max_grad_norm"),
    "bf16": _precision("bf16"),
    "fp16": _precision("fp16"),
    "pure_bf16": _pure_bf16,
    "disable_gradient_checkpointing": _not_gc,
    "gradient_checkpointing": _to("train.gradient_checkpointing"),
    "torch_compile": _to("train.compile"),
    "torch_compile_backend": _to("train.compile_backend"),
    "torch_compile_mode": _to("train.compile_mode"),
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
    "group_by_length": _to("train.group_by_length"),
    "ddp_timeout": _to("train.ddp_timeout"),
    "deepspeed": _to("train.deepspeed"),
    "fsdp": _fsdp,
    "fsdp_config": _fsdp_config,
    "output_dir": _to_all("output.dir", "eval.lf_dir"),
    "max_new_tokens": _to("generation.max_new_tokens"),
    "temperature": _to("generation.temperature"),
    "top_p": _to("generation.top_p"),
    "top_k": _to("generation.top_k"),
    "repetition_penalty": _to("generation.repetition_penalty"),
    "do_sample": _to("generation.do_sample"),
    "infer_backend": _infer_backend,
    "vllm_maxlen": _to("model.vllm.max_len"),
    "vllm_gpu_util": _to("model.vllm.gpu_util"),
    "vllm_enforce_eager": _to("model.vllm.enforce_eager"),
    "vllm_max_lora_rank": _to("model.vllm.max_lora_rank"),
    "vllm_config": _vllm_config,
    "export_dir": _to("export.dir"),
    "do_predict": _evaluate_after("predict"),
    "predict_with_generate": _evaluate_after("predict"),
    "do_eval": _evaluate_after("loss"),
    "early_stopping_steps": _to("train.early_stopping_steps"),
    "load_best_model_at_end": _to("train.load_best_model_at_end"),
    "metric_for_best_model": _to("train.metric_for_best_model"),
    "greater_is_better": _to("train.greater_is_better"),
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
    "pref_beta": _to_all("dpo.beta", "kto.beta", "grpo.beta"),
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
    # stage ppo: the reward model and LF's ppo_* keys
    "reward_model": _to("reward_model.path"),
    "reward_model_type": _to("reward_model.type"),
    "reward_model_adapters": _to("reward_model.adapters"),
    "reward_model_quantization_bit": _to("reward_model.quantization_bit"),
    "ppo_buffer_size": _to("ppo.buffer_size"),
    "ppo_epochs": _to("ppo.epochs"),
    "ppo_score_norm": _to("ppo.score_norm"),
    "ppo_target": _to("ppo.target"),
    "ppo_whiten_rewards": _to("ppo.whiten_rewards"),
    "precompute_ref_log_probs": _to("reference.precompute"),  # TRL's key; LF has none
    # stage grpo (not in LF): TRL's GRPOConfig names, grpo_ prefixed where a bare name would be ambiguous
    "num_generations": _to("grpo.num_generations"),
    "grpo_loss": _to("grpo.loss_type"),
    "grpo_epsilon": _to("grpo.epsilon"),
    "grpo_epsilon_high": _to("grpo.epsilon_high"),
    "scale_rewards": _to("grpo.scale_rewards"),
    "num_iterations": _to("grpo.num_iterations"),
    "max_completion_length": _to("grpo.max_completion_length"),
    "mask_truncated_completions": _to("grpo.mask_truncated_completions"),
    "reward_funcs": _to("grpo.reward_funcs"),
    "reward_weights": _to("grpo.reward_weights"),
}

# Keys accepted with no effect, each with the reason (printed, so nothing is silently ignored).
NO_EFFECT: dict[str, str] = {
    "use_fast_tokenizer": "tuneforge always uses the fast tokenizer",
    "include_num_input_tokens_seen": "tuneforge always logs tokens/s and trained tokens",
    "run_name": "the run is named by output.dir",
    "print_param_status": "the plan printed before training lists trainable parameters",
    "ddp_find_unused_parameters": "tuneforge configures DDP itself",
    "low_cpu_mem_usage": "transformers 5 always loads with low memory use",
    "buffer_size": "it sizes LLaMA-Factory's streaming shuffle buffer, and tuneforge does not stream",
    "compute_accuracy": "evaluation always reports eval_accuracy (token accuracy over all trained tokens)",
    "dataloader_num_workers": "batches are collated in the training process from tokenized rows already in "
                              "memory, so there is no loading for worker processes to take over",
}

# Keys of LLaMA-Factory that tuneforge does not support yet: an error names them instead of ignoring them.
UNSUPPORTED: dict[str, str] = {
    key: reason
    for reason, keys in {
        "exports are safetensors only (the legacy .bin format can run code when loaded)": ["export_legacy_format"],
        "tuneforge tokenizes the whole dataset once (cached, or saved with tokenized_path) and computes the "
        "batch order from (seed, step) so runs resume exactly, which a stream cannot give; for large data use "
        "tokenized_path, preprocessing_num_workers and max_samples": ["streaming"],
        "Unsloth and Liger kernels are not used; tuneforge's own fused loss and attention paths apply": [
            "use_unsloth", "enable_liger_kernel",
        ],
        "LongLoRA's shifted sparse attention is not supported; extend the context with rope_scaling": ["shift_attn"],
        "norms and the output head run in the compute dtype, and the loss is always computed in fp32": [
            "upcast_layernorm", "upcast_lmhead_output",
        ],
        "quantized models are placed by tuneforge (whole model on the training device)": ["quantization_device_map"],
        "the MoE router's auxiliary loss is not added; train MoE models with their router frozen (freeze)": [
            "moe_aux_loss_coef",
        ],
    }.items()
    for key in keys
}


# The rest of LLaMA-Factory 0.9.5's keys (tests/fixtures/llamafactory/lf_0.9.5_keys.json lists them all, made by
# scripts/lf_keys.py): settings of features that do not apply to text-model training here. Accepted with a notice.
NO_EFFECT.update({
    key: reason
    for reason, keys in {
        "a multimodal setting: tuneforge trains text models, for which LLaMA-Factory ignores it too": [
            "image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches", "video_max_pixels",
            "video_min_pixels", "video_fps", "video_maxlen", "audio_sampling_rate", "use_audio_in_video",
            "media_dir", "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model",
        ],
        "a setting of the SGLang / KTransformers inference back-ends, which tuneforge does not use": [
            "sglang_maxlen", "sglang_mem_fraction", "sglang_tp_size", "sglang_config", "sglang_lora_backend",
            "kt_weight_path", "kt_expert_checkpoint_path", "kt_lora_expert_num", "kt_lora_expert_intermediate_size",
            "kt_use_lora_experts",
        ],
        "tuneforge's logs and progress bar are fixed (metrics.jsonl, TensorBoard, the console every logging_steps)": [
            "log_level", "log_level_replica", "log_on_each_node", "logging_nan_inf_filter", "disable_tqdm",
            "skip_memory_metrics", "include_effective_tokens_per_second", "logging_first_step",
        ],
        "the data pipeline here needs no such tuning (tokenization is cached; batches are built in-process)": [
            "preprocessing_batch_size", "dataloader_pin_memory", "dataloader_persistent_workers",
            "dataloader_prefetch_factor", "data_shared_file_system", "remove_unused_columns", "label_names",
            "length_column_name", "ignore_pad_token_for_loss", "dataloader_drop_last",
        ],
        "evaluation here always runs on whole batches in one process group and reports the mean": [
            "eval_accumulation_steps", "eval_do_concat_batches", "eval_use_gather_object", "batch_eval_metrics",
            "include_for_metrics", "prediction_loss_only", "eval_on_each_dataset",
        ],
        "distributed settings are chosen by tuneforge / torchrun (MASTER_ADDR, MASTER_PORT, LOCAL_RANK)": [
            "local_rank", "ddp_backend", "ddp_broadcast_buffers", "ddp_bucket_cap_mb", "ddp_static_graph",
            "master_addr", "master_port", "save_on_each_node", "accelerator_config", "average_tokens_across_devices",
        ],
        "downloads go through the hub library's cache (set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE to control them)": [
            "download_mode",
        ],
        "tuneforge always restores the full loop state on resume (data position, RNG, schedule)": [
            "ignore_data_skip", "restore_callback_states_from_checkpoint",
        ],
    }.items()
    for key in keys
})

# Keys accepted only at their "do nothing" value (None, false, "", [] or a listed one); any other value asks for
# a feature tuneforge does not have, and is refused with the reason and what to use instead.
INERT_VALUES: dict[str, tuple[Any, ...]] = {
    "logging_strategy": ("steps",), "hub_strategy": ("every_save",), "train_sampling_strategy": ("random",),
    "debug": ("",), "torch_empty_cache_steps": (), "eval_delay": (0, 0.0), "label_smoothing_factor": (0, 0.0),
    "mixture_of_depths": (), "use_kv_cache": (True,), "use_reentrant_gc": (True,), "infer_dtype": ("auto",),
    "lr_scheduler_kwargs": ({},), "generation_config": (), "offload_folder": ("offload",), "use_v1_kernels": (),
    "num_beams": (1,), "length_penalty": (1.0, 1), "skip_special_tokens": (True,), "max_length": (1024,),
    "generation_num_beams": (1,), "eval_num_beams": (1,), "batch_size": (4,), "swanlab_mode": ("cloud",),
    "profiler_wait_steps": (1,), "profiler_warmup_steps": (1,), "profiler_active_steps": (3,), "profiler_repeat": (1,),
    "profiler_output_dir": (), "profiler_record_shapes": (True,), "profiler_profile_memory": (True,),
    "profiler_with_stack": (True,), "profile_modules": (), "fp8_backend": ("auto",), "export_quantization_maxlen": (1024,),
    "export_quantization_nsamples": (128,), "project": ("huggingface",), "trackio_space_id": ("trackio",),
    "use_unsloth_gc": (), "preserve_thinking": (),
}

REFUSED: dict[str, str] = {
    key: reason
    for reason, keys in {
        "pushing to a hub is not built in; upload the run folder or export with `huggingface-cli upload`": [
            "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push",
            "hub_revision", "export_hub_model_id", "ms_hub_token", "om_hub_token",
        ],
        "beam search is not offered; use sampling settings (temperature, top_p, top_k) or greedy decoding": [
            "num_beams", "length_penalty", "generation_num_beams", "eval_num_beams",
        ],
        "profiling is not built in; run `python -m torch.utils.bottleneck` or py-spy on `tuneforge train`": [
            "enable_torch_profiler", "profiler_wait_steps", "profiler_warmup_steps", "profiler_active_steps",
            "profiler_repeat", "profiler_output_dir", "profiler_record_shapes", "profiler_profile_memory",
            "profiler_with_stack", "profile_modules",
        ],
        "FP8 training needs GPUs with FP8 units and is not built in; use bf16": [
            "fp8", "fp8_backend", "fp8_enable_fsdp_float8_all_gather",
        ],
        "Ray, Megatron (mcore_adapter), HyperParallel and KTransformers launchers are not supported; "
        "use torchrun / accelerate launch": [
            "ray_num_workers", "ray_init_kwargs", "use_mca", "use_hyper_parallel", "hyper_parallel_args", "use_kt",
        ],
        "SwanLab / trackio logging is not wired up; use report_to: tensorboard (or wandb, mlflow)": [
            "use_swanlab", "swanlab_project", "swanlab_workspace", "swanlab_run_name", "swanlab_mode",
            "swanlab_api_key", "swanlab_logdir", "swanlab_lark_webhook_url", "swanlab_lark_secret",
            "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "project",
        ],
        "TF32 and fused-kernel switches are not offered; tuneforge picks its own kernels": [
            "tf32", "use_liger_kernel",
            "liger_kernel_config", "use_v1_kernels", "use_unsloth_gc", "enable_jit_checkpoint",
        ],
        "mixture-of-depths conversion is not supported": ["mixture_of_depths"],
        "transformers' optimizer arguments are not read; use LLaMA-Factory's use_galore / galore_target (and "
        "use_apollo, use_badam, ...) and adam_beta1, adam_beta2, adam_epsilon": ["optim_args", "optim_target_modules"],
        "training from random weights is not supported; start from a pretrained model": ["train_from_scratch"],
        "GPTQ/AWQ export quantization is not supported; export to GGUF (export.gguf: [q8_0]) instead": [
            "export_quantization_bit", "export_quantization_dataset", "export_quantization_nsamples",
            "export_quantization_maxlen",
        ],
        "only the HF Trainer's defaults of these are supported": [
            "logging_strategy", "train_sampling_strategy", "debug", "torch_empty_cache_steps", "eval_delay",
            "label_smoothing_factor", "auto_find_batch_size", "full_determinism", "eval_on_start", "sortish_sampler",
            "bf16_full_eval", "fp16_full_eval", "gradient_checkpointing_kwargs", "lr_scheduler_kwargs",
            "parallelism_config", "generation_config", "generation_max_length", "use_cache", "use_kv_cache",
            "use_reentrant_gc", "offload_folder", "infer_dtype", "skip_special_tokens", "max_length", "batch_size",
            "adapter_folder", "preserve_thinking",
        ],
    }.items()
    for key in keys
    if key not in MAPPING and key not in NO_EFFECT and key not in UNSUPPORTED
}

_INERT = (None, False, "", [], {})


def is_inert(key: str, value: Any) -> bool:
    """True when a refused key holds its "do nothing" value (unset, off, or LLaMA-Factory's default)."""
    if value in INERT_VALUES.get(key, ()) or isinstance(value, str) and value.lower() in {"none", "null", "false"}:
        return True
    return any(value is v or (type(value) is type(v) and value == v) for v in _INERT)


def is_lf_key(key: str) -> bool:
    """True for any key this module knows from LLaMA-Factory (mapped, no-effect or unsupported)."""
    return key in MAPPING or key in NO_EFFECT or key in UNSUPPORTED or key in REFUSED


def map_key(key: str, value: Any) -> tuple[Assignments, str | None]:
    """Assignments in our dialect for one LF key, plus a notice for keys that have no effect."""
    if key in UNSUPPORTED or key in REFUSED:
        if is_inert(key, value):
            return [], None
        reason = UNSUPPORTED.get(key) or REFUSED[key]
        raise ConfigError(f"'{key}: {value}' (LLaMA-Factory) is not supported by tuneforge: {reason}. "
                          "Remove the key (or set it to its default) to continue.")
    if key in NO_EFFECT:
        return [], f"'{key}' has no effect: {NO_EFFECT[key]}"
    return MAPPING[key](value), None


def fate(key: str) -> tuple[str, str]:
    """What happens to an LF key here: ("mapped", what it sets), ("no effect", why) or ("refused", why)."""
    if key in MAPPING:
        convert = MAPPING[key]
        doc = " ".join((convert.__doc__ or "").strip().split("\n\n")[0].split())
        return "mapped", getattr(convert, "target", None) or doc or convert.__name__
    if key in NO_EFFECT:
        return "no effect", NO_EFFECT[key]
    if key in UNSUPPORTED or key in REFUSED:
        inert = ", ".join(repr(v) for v in INERT_VALUES.get(key, ())) or "unset / false"
        return "refused", f"{UNSUPPORTED.get(key) or REFUSED[key]} (accepted when {inert})"
    raise KeyError(key)


def key_table(lf_keys: dict[str, dict[str, str]]) -> str:
    """A Markdown table of every LLaMA-Factory key (from scripts/lf_keys.py's list) and its fate here."""
    lines = ["| key | defined by | fate | here |", "|---|---|---|---|"]
    extra = sorted(k for k in (*MAPPING, *NO_EFFECT, *UNSUPPORTED, *REFUSED) if k not in lf_keys)
    for key in [*sorted(lf_keys), *extra]:
        origin = lf_keys[key]["defined_by"] if key in lf_keys else "older versions / TRL"
        kind, detail = fate(key)
        lines.append(f"| `{key}` | {origin} | {kind} | {detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
