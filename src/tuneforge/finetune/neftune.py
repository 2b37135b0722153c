"""NEFTune: uniform noise on the input embeddings while training (Jain et al. 2023; the HF Trainer's
neftune_noise_alpha). Each embedding entry moves by at most alpha / sqrt(length * hidden)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def neftune_noise(embeddings: Tensor, alpha: float) -> Tensor:
    """Embeddings [b, t, h] plus noise drawn uniformly from [-alpha / sqrt(t * h), +alpha / sqrt(t * h)]."""
    bound = alpha / math.sqrt(embeddings.shape[1] * embeddings.shape[2])
    return embeddings + torch.empty_like(embeddings).uniform_(-bound, bound)


def add_neftune(model: nn.Module, alpha: float) -> Any:
    """Hook the input embedding layer so its output is noised in training mode with gradients on (the training
    forward); evaluation, generation and no-grad reference passes see clean embeddings. Returns the hook handle."""
    embed = model.get_input_embeddings()  # peft models pass this through to the base

    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        if module.training and torch.is_grad_enabled():
            return neftune_noise(output, alpha)
        return output

    return embed.register_forward_hook(hook)
