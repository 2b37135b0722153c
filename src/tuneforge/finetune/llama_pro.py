"""LLaMA-Pro block expansion (`tuneforge expand`, LLaMA-Factory's scripts/llama_pro.py): after every group of
layers / num_expand decoder layers, insert a copy of the group's last layer whose output projections (o_proj,
down_proj) are zero. Each new block then adds nothing to the residual stream, so the expanded model computes
exactly the original function; training only the new blocks (finetune.llama_pro) adds knowledge beside the old."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from tuneforge.config.schema import ModelConfig
from tuneforge.errors import ConfigError
from tuneforge.finetune.methods import decoder_layers

ZEROED = ("o_proj", "down_proj")  # the projections that write a block's result into the residual stream
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")  # config lists with one entry per decoder layer


def expand_layers(model: nn.Module, num_expand: int) -> list[int]:
    """Insert the zero-output copies in place; returns the new layers' indices."""
    prefix, total = decoder_layers(model)
    if num_expand < 1 or total % num_expand:
        raise ConfigError(f"--num_expand must divide the model's {total} layers, got {num_expand}")
    layers: nn.ModuleList = model.get_submodule(prefix)
    group = total // num_expand
    expanded: list[nn.Module] = []
    added: list[int] = []
    for i, layer in enumerate(layers):
        expanded.append(layer)
        if (i + 1) % group == 0:
            added.append(len(expanded))
            expanded.append(zero_output_copy(layer))
    parent, _, name = prefix.rpartition(".")
    setattr(model.get_submodule(parent), name, nn.ModuleList(expanded))
    for index, layer in enumerate(expanded):  # attention caches are addressed by layer index
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    update_config(model.config, total, group)
    return added


def zero_output_copy(layer: nn.Module) -> nn.Module:
    """A deep copy of a decoder layer whose o_proj and down_proj weights (and biases) are zero."""
    block = copy.deepcopy(layer)
    zeroed = 0
    for name, module in block.named_modules():
        if name.rsplit(".", 1)[-1] in ZEROED:
            for param in module.parameters(recurse=False):
                torch.nn.init.zeros_(param)
            zeroed += 1
    if zeroed < 2:
        raise ConfigError(f"cannot expand this architecture: its layers have no {' / '.join(ZEROED)} projections "
                          "(LLaMA-Pro needs Llama-style blocks: Llama, Mistral, Qwen, Yi, ...)")
    return block


def update_config(config: object, total: int, group: int) -> None:
    """num_hidden_layers, and per-layer lists such as layer_types, follow the new layer order."""
    sources = [i for i in range(total) for _ in range(2 if (i + 1) % group == 0 else 1)]  # new index -> copied from
    for key in PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == total:
            setattr(config, key, [value[i] for i in sources])
    config.num_hidden_layers = len(sources)


def expand_model(model_path: str, output_dir: str | Path, num_expand: int, trust_remote_code: bool = False) -> Path:
    """Load a model, expand it by num_expand blocks, and save it (safetensors, config, tokenizer) to output_dir."""
    from transformers import AutoConfig

    from tuneforge.models.hub import resolve_model_dir
    from tuneforge.models.load import load_model, load_tokenizer

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--output_dir {out} is not empty; choose a new folder")
    cfg = ModelConfig(path=model_path, trust_remote_code=trust_remote_code)
    saved_dtype = AutoConfig.from_pretrained(resolve_model_dir(cfg), trust_remote_code=trust_remote_code).dtype
    model = load_model(cfg, dtype=saved_dtype if isinstance(saved_dtype, torch.dtype) else torch.float32)
    tokenizer = load_tokenizer(cfg)
    expand_layers(model, num_expand)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
