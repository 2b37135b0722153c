"""Cross-entropy over the vocabulary computed only at trained positions, chunk by chunk.

The output projection and the loss are fused: each chunk's logits exist only inside forward, where the
gradients with respect to the hidden states (and the head weight, when it trains) are computed at once.
So a [tokens, vocab] logits tensor is never kept for backward and nothing is recomputed.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_TOKENS = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, compute_dtype: torch.dtype,
                chunk: int) -> Tensor:
        # hidden [n, h], weight [v, h], targets [n] -> summed loss (fp32 scalar)
        device_type = hidden.device.type
        with torch.autocast(device_type, enabled=False):
            w = weight.to(compute_dtype)
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(compute_dtype)  # [c, h]
                y = targets[start:start + chunk]  # [c]
                logits = (h @ w.T).float()  # [c, v]
                lse = torch.logsumexp(logits, dim=-1)  # [c]
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                # d(sum of losses)/d logits = softmax - one_hot(target)
                grad_logits = torch.exp(logits.sub_(lse[:, None]))
                grad_logits[torch.arange(len(y), device=y.device), y] -= 1
                grad_logits = grad_logits.to(compute_dtype)
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk] = (grad_logits @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output if grad_hidden is not None else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = CHUNK_TOKENS) -> Tensor:
    """Sum over rows of CE(hidden @ weight.T, targets); matmuls in the autocast dtype when autocast is on."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0).float()
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk)
