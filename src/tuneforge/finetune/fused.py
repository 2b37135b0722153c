"""One projection per shared input: the q/k/v (and gate/up) LoRA layers of a block computed together.

A decoder block feeds the same tensor to its query, key and value projections, and to its MLP's gate and up
projections. Computed one layer at a time that is, per layer, a frozen matmul, LoRA's A and B matmuls, a scaling
and an add. Grouped, the frozen weights of the group sit side by side in one tensor (each layer's weight becomes a
view into it: no extra memory), and the group is one frozen matmul, one matmul by the stacked A matrices, one by a
block-diagonal of the scaled B matrices, and one add; each layer's output is its slice of the result. The sum is
the same; only the rounding order of bf16 products differs.

The first layer of a group called with a new input computes the whole group and keeps the other outputs for the
calls that follow with that same tensor; a call that does not fit (another input, keyword arguments, adapters
disabled or merged, several adapters, DoRA and other variants, LoRA dropout while training, a weight that no longer
lives in the shared tensor) runs the layer's own forward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInput:
    """The LoRA layers of one group and the outputs waiting for their calls."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        bases = [layer.base_layer for layer in layers]
        self.sizes = [base.out_features for base in bases]
        weight = torch.cat([base.weight.detach() for base in bases])  # [sum of outputs, in]
        offsets = [0, *torch.tensor(self.sizes).cumsum(0).tolist()]
        for base, start, end in zip(bases, offsets, offsets[1:]):  # each layer's weight: a view into the group's
            base.weight = nn.Parameter(weight[start:end], requires_grad=False)
        self.weight = weight
        self.bias = None
        if bases[0].bias is not None:  # (grouped only when every layer has a bias or none has)
            self.bias = torch.cat([base.bias.detach() for base in bases])
            for base, start, end in zip(bases, offsets, offsets[1:]):
                base.bias = nn.Parameter(self.bias[start:end], requires_grad=False)
        self.pointers = [(base.weight.data_ptr(), base.bias.data_ptr() if base.bias is not None else 0)
                         for base in bases]
        self.source: Tensor | None = None
        self.version = -1
        self.pending: dict[int, Tensor] = {}

    def fits(self, x: Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one adapter name the group can be computed with, or None when a layer must run on its own."""
        if args or kwargs:
            return None
        if len({bool(layer.disable_adapters) for layer in self.layers}) != 1:
            return None
        names = None
        for layer in self.layers:
            active = list(layer.active_adapters)
            if layer.merged or len(active) != 1 or (names is not None and active != names):
                return None
            names = active
            if layer.disable_adapters:
                continue
            if active[0] not in layer.lora_A or active[0] in layer.lora_variant:
                return None
            dropout = layer.lora_dropout[active[0]]
            if layer.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
                return None
        for layer, pointers in zip(self.layers, self.pointers):  # the weights still live in the shared tensors
            base = layer.base_layer
            if base.weight.requires_grad or (base.weight.data_ptr(),
                                             base.bias.data_ptr() if base.bias is not None else 0) != pointers:
                return None
        return names[0] if names else None

    def compute(self, x: Tensor, name: str) -> list[Tensor]:
        """Every layer's output for input x."""
        out = F.linear(x, self.weight, self.bias)
        if not self.layers[0].disable_adapters:  # (fits: disabled for all layers or for none)
            a = torch.cat([layer.lora_A[name].weight for layer in self.layers])  # [sum of ranks, in]
            b = torch.block_diag(*(layer.lora_B[name].weight * layer.scaling[name] for layer in self.layers))
            # without autocast a bf16 input meets fp32 adapters: cast as peft does, the sum in the output's dtype
            inputs = x if x.dtype == a.dtype or torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)
            out = out + F.linear(F.linear(inputs, a), b).to(out.dtype)
        return list(out.split(self.sizes, dim=-1))

    def forward(self, index: int, original: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Layer `index`'s forward: its waiting output, the whole group's computed now, or its own forward."""
        if x is self.source and x._version == self.version and index in self.pending:
            out = self.pending.pop(index)
            if not self.pending:
                self.source = None
            return out
        name = self.fits(x, args, kwargs)
        if name is None:
            return original(x, *args, **kwargs)
        outs = self.compute(x, name)
        self.pending = {i: out for i, out in enumerate(outs) if i != index}
        self.source, self.version = x, x._version
        return outs[index]


def fuse_shared_inputs(model: nn.Module) -> int:
    """Group the LoRA layers of each block that share an input (GROUPS: those of them that are adapted, at least
    two); how many groups were made.

    Only plain LoRA layers (peft's lora.Linear, not quantized) over frozen, unsharded weights are grouped."""
    from peft.tuners.lora import Linear as LoraLinear

    parents: dict[str, dict[str, nn.Module]] = {}
    for path, module in model.named_modules():
        if type(module) is LoraLinear and type(module.base_layer) is nn.Linear:
            parent, _, leaf = path.rpartition(".")
            parents.setdefault(parent, {})[leaf] = module
    made = 0
    for children in parents.values():
        for names in GROUPS:  # the members that carry adapters (q_proj and v_proj only, say), if at least two
            layers = [children[n] for n in names if n in children]
            if len(layers) < 2 or any(getattr(layer, "_shared_input", None) for layer in layers):
                continue
            bases = [layer.base_layer for layer in layers]
            weights = [base.weight for base in bases]
            if any(w.requires_grad or w.dtype != weights[0].dtype or w.device != weights[0].device
                   or w.shape[1] != weights[0].shape[1] or hasattr(w, "ds_id") for w in weights) \
                    or len({base.bias is None for base in bases}) != 1 \
                    or any(base.bias is not None and base.bias.requires_grad for base in bases):
                continue
            group = SharedInput(layers)
            for index, layer in enumerate(layers):
                layer.forward = functools.partial(group.forward, index, layer.forward)
                layer._shared_input = group
            made += 1
    return made


def unfuse(model: nn.Module) -> None:
    """Undo fuse_shared_inputs: each layer's own forward, and its weight in storage of its own again (a merge or a
    safetensors save must not find weights sharing memory)."""
    for module in model.modules():
        group = module.__dict__.pop("_shared_input", None)
        if group is None:
            continue
        module.__dict__.pop("forward", None)
        base = module.base_layer
        base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        if base.bias is not None:
            base.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        group.pending.clear()
        group.source = None
