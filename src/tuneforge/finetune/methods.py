"""Apply a fine-tuning method to a loaded model: mark what trains, add adapters (LoRA, OFT)."""

from __future__ import annotations

import contextlib
import logging
import re
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.config.schema import FinetuneConfig, FreezeConfig, LoraConfig, OFTConfig
from tuneforge.errors import ConfigError

log = logging.getLogger(__name__)
ADAPTER_METHODS = ("lora", "oft")  # methods that train a peft adapter and save adapter/ instead of model/

# The initial A/B of each PiSSA adapter, kept to save it converted to plain LoRA (finetune.lora.pissa_convert).
_PISSA_START: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def apply_method(model: nn.Module, finetune: FinetuneConfig, adapters: list[str], quantized: bool = False,
                 gradient_checkpointing: bool = False) -> nn.Module:
    """Return the model ready to train with the configured method; trainable parameters kept in fp32."""
    if finetune.method not in ADAPTER_METHODS and adapters:
        model = merge_adapters(model, adapters)
    expanded = expanded_layers(model, finetune.freeze.trainable_layers) if finetune.llama_pro else None
    if finetune.method == "full":
        model.requires_grad_(True)
    elif finetune.method == "freeze":
        apply_freeze(model, finetune.freeze, expanded)
    elif finetune.method == "oft":
        model = apply_oft(model, finetune.oft, adapters, quantized, gradient_checkpointing, expanded)
    else:
        with no_bitsandbytes_layers(model):
            model = apply_lora(model, finetune.lora, adapters, quantized, gradient_checkpointing, expanded)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    upcast_trainable(model)
    return model


@contextlib.contextmanager
def no_bitsandbytes_layers(model: nn.Module) -> Iterator[None]:
    """While peft adds LoRA to a model that holds no bitsandbytes layer (training, loading adapters to chat, merge
    or serve), have it skip its bitsandbytes dispatchers.

    peft's LoRA imports bitsandbytes the first time it wraps a layer, to offer adapters for bitsandbytes' quantized
    layers, and bitsandbytes' CPU backend imports torch.compile's machinery on import (~1.2-1.8 s of every run's
    start here), for layers an unquantized model cannot have. Only the two availability checks peft's LoRA model
    module reads at that moment answer "no", and are put back after; a quantized model, or a process that has
    already imported the dispatchers, goes through peft unchanged. (The checks are module attributes: a quantized
    model given LoRA on another thread inside this window would miss its layers; tuneforge loads models one at a
    time.)"""
    import sys

    import peft.tuners.lora.model as lora_model

    quantized = any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    if quantized or "peft.tuners.lora.bnb" in sys.modules:
        yield
        return
    saved = lora_model.is_bnb_available, lora_model.is_bnb_4bit_available
    lora_model.is_bnb_available = lora_model.is_bnb_4bit_available = _unavailable
    try:
        yield
    finally:
        lora_model.is_bnb_available, lora_model.is_bnb_4bit_available = saved


def _unavailable() -> bool:
    return False


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


def expanded_layers(model: nn.Module, added: int) -> list[int]:
    """The blocks `tuneforge expand` added (LLaMA-Pro): the last of every group of layers / added layers."""
    _, total = decoder_layers(model)
    if added < 1 or total % added:
        raise ConfigError(f"finetune.llama_pro: the model has {total} layers, which is not a multiple of "
                          f"finetune.freeze.trainable_layers={added}; set it to the --num_expand used to expand it")
    stride = total // added
    return list(range(stride - 1, total, stride))


def apply_freeze(model: nn.Module, freeze: FreezeConfig, only_layers: list[int] | None = None) -> None:
    """Train the last (positive count) or first (negative count) N layers, or the given ones (LLaMA-Pro),
    optionally only named modules."""
    prefix, total = decoder_layers(model)
    n = freeze.trainable_layers
    if abs(n) > total:
        raise ConfigError(f"finetune.freeze.trainable_layers={n} but the model has {total} layers")
    layers = only_layers if only_layers is not None else range(total - n, total) if n > 0 else range(0, -n)
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


def prepare_adapter_base(model: nn.Module, adapters: list[str], create_new: bool, quantized: bool,
                         gradient_checkpointing: bool) -> tuple[nn.Module, str | None]:
    """Ready the base for a peft adapter: k-bit preparation, earlier adapters merged; returns the model and the
    adapter to continue training (the last given one unless a new one is asked for)."""
    from peft import prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if not adapters:
        return model, None
    if quantized and (len(adapters) > 1 or create_new):
        raise ConfigError("adapters cannot be merged into a quantized base; load it unquantized to stack adapters")
    to_merge = adapters if create_new else adapters[:-1]
    if to_merge:
        model = merge_adapters(model, to_merge)
    return model, None if create_new else adapters[-1]


def continue_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load a saved adapter (LoRA, OFT, ...: peft reads its type from adapter_config.json) to train it further."""
    from peft import PeftModel

    log.info("continuing adapter %s", path)
    return PeftModel.from_pretrained(model, path, is_trainable=True)


def adapter_targets(model: nn.Module, targets: list[str], only_layers: list[int] | None) -> Any:
    """peft target_modules: 'all-linear', the given names, or (LLaMA-Pro) the matching linear modules of the
    expanded layers only, by full name."""
    if only_layers is None:
        return "all-linear" if targets == ["all"] else targets
    prefix, _ = decoder_layers(model)
    inside = tuple(f"{prefix}.{i}." for i in only_layers)
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
             and name.startswith(inside) and (targets == ["all"] or name.rsplit(".", 1)[-1] in targets)]
    if not names:
        raise ConfigError(f"finetune targets {targets} match no linear module in the expanded layers {only_layers}")
    return names


def apply_lora(model: nn.Module, lora: LoraConfig, adapters: list[str], quantized: bool,
               gradient_checkpointing: bool, only_layers: list[int] | None = None) -> nn.Module:
    """Add a new LoRA adapter, continue the last given one, or stack a new one on merged old ones."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model, resume = prepare_adapter_base(model, adapters, lora.create_new_adapter, quantized, gradient_checkpointing)
    if resume:
        return continue_adapter(model, resume)
    init: Any = True
    if lora.pissa_init:
        init = "pissa" if lora.pissa_iter == -1 else f"pissa_niter_{lora.pissa_iter}"
    config = PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha or 2 * lora.rank, lora_dropout=lora.dropout,
        target_modules=adapter_targets(model, lora.targets, only_layers),
        use_rslora=lora.rslora, use_dora=lora.dora, init_lora_weights=init,
        modules_to_save=lora.modules_to_save or None, task_type="CAUSAL_LM",
        # A trained copy of a tied head/embedding must stay tied to its twin, or merging breaks them apart.
        ensure_weight_tying=bool(lora.modules_to_save) and bool(getattr(model.config, "tie_word_embeddings", False)),
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"finetune.lora: {err}") from None
    if lora.pissa_init and lora.pissa_convert:
        remember_pissa_start(model)
    return model


def apply_oft(model: nn.Module, oft: OFTConfig, adapters: list[str], quantized: bool,
              gradient_checkpointing: bool, only_layers: list[int] | None = None) -> nn.Module:
    """Add a new OFT adapter (orthogonal block rotations of each adapted weight), or continue a saved one."""
    from peft import OFTConfig as PeftOFTConfig
    from peft import get_peft_model

    model, resume = prepare_adapter_base(model, adapters, oft.create_new_adapter, quantized, gradient_checkpointing)
    if resume:
        return continue_adapter(model, resume)
    try:
        config = PeftOFTConfig(r=oft.rank, oft_block_size=oft.block_size, module_dropout=oft.dropout,
                               target_modules=adapter_targets(model, oft.targets, only_layers),
                               modules_to_save=oft.modules_to_save or None, task_type="CAUSAL_LM")
        return get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"finetune.oft: {err}") from None


def remember_pissa_start(model: nn.Module) -> None:
    """Keep the PiSSA adapter's starting A and B (CPU copies) for converting it to plain LoRA when saving."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name="default")
    _PISSA_START[model] = {k: v.detach().to("cpu", copy=True) for k, v in state.items() if ".lora_" in k}


def save_adapter(model: nn.Module, folder: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Save only the trained adapter ("default", not a frozen reference copy beside it); a PiSSA adapter with
    pissa_convert is written as the plain LoRA adapter it amounts to on the original, unmodified base.
    weights: the model's state dict to take the adapter from (default: the model's own)."""
    start = _PISSA_START.get(model)
    model.save_pretrained(folder, safe_serialization=True, selected_adapters=["default"],
                          **({"state_dict": weights} if weights is not None else {}))
    if start is not None:
        convert_pissa_folder(folder, start)


def convert_pissa_folder(folder: Path, start: dict[str, torch.Tensor]) -> None:
    """Rewrite a saved PiSSA adapter as plain LoRA on the original base.

    PiSSA trains W_res + s * B A where W_res = W - s * B0 A0, so the change to the original W is
    s * (B A - B0 A0) = s * [B | -B0] [A ; A0]: a rank-2r LoRA with the same scale s (alpha doubles with r).
    """
    import json

    from safetensors.torch import load_file, save_file

    weights_path, config_path = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    weights = load_file(str(weights_path))
    for key, value in weights.items():
        if ".lora_A." in key:  # [r, in]
            weights[key] = torch.cat([value, start[key].to(value.dtype)], dim=0)
        elif ".lora_B." in key:  # [out, r]
            weights[key] = torch.cat([value, -start[key].to(value.dtype)], dim=1)
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["r"] *= 2
    config["lora_alpha"] *= 2 ** 0.5 if config.get("use_rslora") else 2  # keep alpha / r (or / sqrt(r)) unchanged
    config["init_lora_weights"] = True  # a plain adapter: loading it must not run the PiSSA SVD on the base again
    save_file({k: v.contiguous() for k, v in weights.items()}, str(weights_path), metadata={"format": "pt"})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def merge_adapters(model: nn.Module, adapters: list[str]) -> nn.Module:
    """Load each adapter in turn and merge it into the base weights."""
    from peft import PeftModel

    with no_bitsandbytes_layers(model):
        for path in adapters:
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    """The model's peft adapter layers (those that cast their input to the adapter's dtype)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


@contextlib.contextmanager
def adapter_inputs_as_autocast(model: nn.Module, layers: list[nn.Module] | None = None) -> Iterator[None]:
    """Context for a forward pass: under autocast, adapter layers take their input as it comes.

    peft casts each adapter's input to the adapter weight's dtype (fp32 under bf16 training), and autocast casts it
    straight back to bf16 for the matmul: an exact round trip that copies every layer input twice. Outside
    autocast the cast is needed (a bf16 input meeting fp32 adapter weights), so it stays on there. `layers`:
    tuner_layers(model) found once by the caller (walking the model's modules each pass cost ~16 ms, twice, on
    the 30-layer embedded model), as peft's own disable_input_dtype_casting does."""
    if not any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
        yield
        return
    layers = tuner_layers(model) if layers is None else layers
    saved = [layer.cast_input_dtype_enabled for layer in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer.cast_input_dtype_enabled = value


def full_numel(param: nn.Parameter) -> int:
    """A parameter's whole size (DeepSpeed ZeRO-3 may have partitioned it at load time)."""
    return getattr(param, "ds_numel", None) or param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their packed elements twice, and weights that
    DeepSpeed ZeRO-3 partitioned at load time their whole size (ds_numel)."""
    trainable = total = 0
    for param in model.parameters():
        n = full_numel(param) * (2 if param.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
