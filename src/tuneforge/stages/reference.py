"""The reference model of dpo and kto: which weights it is, and log-probs from it without gradients.

- reference.model set: a separate frozen model (+ merged reference.adapters, optionally quantized);
- LoRA with a new adapter: the policy with its adapter switched off (the base: no extra memory);
- LoRA continuing an existing adapter: a frozen second copy of that starting adapter ("ref") on the same base,
  so the reference is where training started, not the bare base (LLaMA-Factory gets this wrong);
- full or freeze tuning: a frozen copy of the starting model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tuneforge.config.schema import RunConfig
from tuneforge.finetune.methods import no_bitsandbytes_layers
from tuneforge.train.losses import TokenLogps

REF_ADAPTER = "ref"


@dataclasses.dataclass
class Reference:
    """Where reference log-probs come from: a separate model, or the policy with adapters switched."""

    kind: str  # separate | adapter-off | adapter-copy | frozen-copy
    description: str
    model: nn.Module | None = None  # the separate / frozen-copy model

    @contextlib.contextmanager
    def active(self, policy: nn.Module) -> Iterator[nn.Module]:
        """The module whose forward is the reference (no gradients inside)."""
        with torch.no_grad():
            if self.model is not None:
                yield self.model
            elif self.kind == "adapter-off":
                with peft_model(policy).disable_adapter():
                    yield policy
            else:
                with use_adapter(peft_model(policy), REF_ADAPTER):
                    yield policy

    def logps(self, policy: nn.Module, batch: dict[str, torch.Tensor]) -> TokenLogps:
        """Reference log-probs of the batch's trained tokens."""
        from tuneforge.stages.base import batch_token_logps

        with self.active(policy) as model:
            return batch_token_logps(model, batch)

    def release(self, policy: nn.Module) -> None:
        """Free the reference's memory (after its log-probs were precomputed)."""
        if self.kind == "adapter-copy":
            peft_model(policy).delete_adapter(REF_ADAPTER)
        self.model = None
        self.kind = "released"


def peft_model(model: nn.Module) -> Any:
    """The peft model inside value-head / DDP wrappers."""
    while not hasattr(model, "disable_adapter"):
        inner = getattr(model, "pretrained_model", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError("the reference needs a peft model here")
        model = inner
    return model


@contextlib.contextmanager
def use_adapter(model: Any, name: str) -> Iterator[None]:
    """Make adapter `name` the active one for a block; which weights train is restored exactly afterwards."""
    trainable = {p: p.requires_grad for p in model.parameters()}
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for param, flag in trainable.items():
            param.requires_grad_(flag)


def build_reference(cfg: RunConfig, policy: nn.Module, device: Any = "cpu") -> Reference:
    """The reference for this run (see the module docstring for the rules); a separate model goes to `device`
    (the policy's: accelerate moves only the trained module), unless bitsandbytes placed it when quantizing."""
    from tuneforge.finetune.methods import merge_adapters
    from tuneforge.models.load import load_model

    ref = cfg.reference
    if ref.model:
        model_cfg = dataclasses.replace(cfg.model, path=ref.model, adapter_path=[], quantization_bit=ref.quantization_bit)
        model = merge_adapters(load_model(model_cfg, dtype=base_dtype(policy)), ref.adapters) if ref.adapters \
            else load_model(model_cfg, dtype=base_dtype(policy))
        extra = f" + {', '.join(ref.adapters)}" if ref.adapters else ""
        model = model if ref.quantization_bit else model.to(device)
        return Reference("separate", f"separate model {ref.model}{extra}", freeze(model))
    adapters = cfg.model.adapter_path
    if cfg.finetune.method in ("lora", "oft"):  # peft adapters: switched off, or a frozen copy of the start
        settings = cfg.finetune.lora if cfg.finetune.method == "lora" else cfg.finetune.oft
        if adapters and not settings.create_new_adapter:
            with no_bitsandbytes_layers(policy):
                peft_model(policy).load_adapter(adapters[-1], adapter_name=REF_ADAPTER, is_trainable=False)
            return Reference("adapter-copy", f"frozen copy of the starting adapter {adapters[-1]}")
        merged = f" with {', '.join(adapters)} merged" if adapters else ""
        return Reference("adapter-off", f"the base model{merged} (the new adapter switched off)")
    model = load_model(cfg.model, dtype=base_dtype(policy))
    if adapters:
        model = merge_adapters(model, adapters)
    return Reference("frozen-copy", f"a frozen copy of the starting model {cfg.model.path}", freeze(model.to(device)))


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the frozen weights (bf16 under bf16 LoRA), else the first parameter's."""
    frozen = [p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    return frozen[0] if frozen else next(model.parameters()).dtype


def freeze(model: nn.Module) -> nn.Module:
    """Evaluation mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def disable_dropout(model: nn.Module) -> None:
    """Preference losses compare log-probs of the same text under two models: dropout would only add noise."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
