"""Apply a fine-tuning method to a loaded model: mark what trains, add adapters."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from tuneforge.config.schema import FinetuneConfig, FreezeConfig, LoraConfig
from tuneforge.errors import ConfigError

log = logging.getLogger(__name__)


def apply_method(model: nn.Module, finetune: FinetuneConfig, adapters: list[str], quantized: bool = False,
                 gradient_checkpointing: bool = False) -> nn.Module:
    """Return the model ready to train with the configured method; trainable parameters kept in fp32."""
    if finetune.method != "lora" and adapters:
        model = merge_adapters(model, adapters)
    if finetune.method == "full":
        model.requires_grad_(True)
    elif finetune.method == "freeze":
        apply_freeze(model, finetune.freeze)
    else:
        model = apply_lora(model, finetune.lora, adapters, quantized, gradient_checkpointing)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    upcast_trainable(model)
    return model


def upcast_trainable(model: nn.Module) -> None:
    """Keep trained weights in fp32 even when the frozen base is bf16 (optimizer updates need the precision)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def decoder_layers(model: nn.Module) -> tuple[str, int]:
    """Dotted prefix of the decoder layer list (e.g. 'model.layers') and how many layers it has."""
    counts: dict[str, int] = {}
    for name, _ in model.named_parameters():
        match = re.match(r"(.*?\.layers)\.(\d+)\.", name) or re.match(r"(.*?\.h)\.(\d+)\.", name)
        if match:
            counts[match.group(1)] = max(counts.get(match.group(1), 0), int(match.group(2)) + 1)
    if not counts:
        raise ConfigError("finetune.method=freeze: cannot find the decoder layers of this model")
    prefix = max(counts, key=counts.get)
    return prefix, counts[prefix]


def apply_freeze(model: nn.Module, freeze: FreezeConfig) -> None:
    """Train the last (positive count) or first (negative count) N layers, optionally only named modules."""
    prefix, total = decoder_layers(model)
    n = freeze.trainable_layers
    if abs(n) > total:
        raise ConfigError(f"finetune.freeze.trainable_layers={n} but the model has {total} layers")
    layers = range(total - n, total) if n > 0 else range(0, -n)
    trainable_prefixes = [f"{prefix}.{i}." for i in layers]
    modules = freeze.trainable_modules
    matched_any = False
    for name, param in model.named_parameters():
        in_layer = any(name.startswith(p) for p in trainable_prefixes)
        module_ok = modules == ["all"] or any(f".{m}." in name for m in modules)
        extra = any(f"{m}." in name and not name.startswith(f"{prefix}.") for m in freeze.extra_modules)
        param.requires_grad_((in_layer and module_ok) or extra)
        matched_any |= in_layer and module_ok
    if not matched_any:
        raise ConfigError(f"finetune.freeze.trainable_modules={modules} matches nothing in layers "
                          f"{list(layers)}; use names like mlp, self_attn")


def apply_lora(model: nn.Module, lora: LoraConfig, adapters: list[str], quantized: bool,
               gradient_checkpointing: bool) -> nn.Module:
    """Add a new LoRA adapter, continue the last given one, or stack a new one on merged old ones."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if adapters:
        if quantized and (len(adapters) > 1 or lora.create_new_adapter):
            raise ConfigError("adapters cannot be merged into a quantized base; load it unquantized to stack adapters")
        to_merge = adapters if lora.create_new_adapter else adapters[:-1]
        if to_merge:
            model = merge_adapters(model, to_merge)
        if not lora.create_new_adapter:
            log.info("continuing adapter %s", adapters[-1])
            return PeftModel.from_pretrained(model, adapters[-1], is_trainable=True)
    targets: Any = "all-linear" if lora.targets == ["all"] else lora.targets
    config = PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha or 2 * lora.rank, lora_dropout=lora.dropout, target_modules=targets,
        use_rslora=lora.rslora, use_dora=lora.dora, init_lora_weights="pissa" if lora.pissa_init else True,
        modules_to_save=lora.modules_to_save or None, task_type="CAUSAL_LM",
        # A trained copy of a tied head/embedding must stay tied to its twin, or merging breaks them apart.
        ensure_weight_tying=bool(lora.modules_to_save) and bool(getattr(model.config, "tie_word_embeddings", False)),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"finetune.lora: {err}") from None


def merge_adapters(model: nn.Module, adapters: list[str]) -> nn.Module:
    """Load each adapter in turn and merge it into the base weights."""
    from peft import PeftModel

    for path in adapters:
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their packed elements twice."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel() * (2 if param.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
