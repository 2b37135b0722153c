"""Causal attention for CPU training steps: the same math as SDPA, with a backward that is cheaper on a CPU.

SDPA's CPU flash kernel is quick forward but slow backward (a [4, 9, 512, 64] bf16 call here: ~5 ms forward, ~30-50
ms backward; at 128 tokens its backward is slower still per token). For training passes of up to
`MAX_TOKENS` tokens, `causal_attention` instead keeps the softmax probabilities of the forward for backward and gets
every gradient from a few batched matmuls and one fused softmax backward (~1.4x to ~3x less time for forward and
backward together at 512 to 128 tokens). Grouped KV heads are handled by viewing the queries of one KV head as
one [groups x tokens, d] block, never by copying keys and values. Queries of longer passes are split in two halves
so the second half of the keys (all masked for the first half of the queries) is never scored.

The cost is memory: probabilities [b, heads, t, t] in the compute dtype per layer until backward (SDPA keeps a
[b, heads, t] log-sum-exp), hence the bound on tokens and on the probabilities' size. Everything else (inference,
dropout, other devices, masks, longer passes) goes to `F.scaled_dot_product_attention`.

Registered in transformers' AttentionInterface as `tuneforge_causal`, with SDPA's mask function: a call that
comes with a mask (padding, a KV cache) goes to transformers' own SDPA path with it. Compiled decoder layers
(`train.compile`) trace it into their graphs, forward and backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "tuneforge_causal"
MAX_TOKENS = 1024  # longest pass that keeps probabilities (measured faster than the flash kernel up to here)
MAX_PROBS = 1 << 24  # and at most this many probabilities a layer (32 MiB in bf16)
SPLIT_FROM = 384  # passes at least this long score their two query halves separately


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        # query [b, h, t, d], key/value [b, kv, t, d] (h = kv * groups) -> [b, h, t, d]
        b, h, t, d = query.shape
        kv = key.shape[1]
        groups = h // kv
        q = (query * scale).view(b, kv, groups, t, d)
        halves = [(0, t)] if t < SPLIT_FROM else [(0, t // 2), (t // 2, t)]
        outs, probs = [], []
        for start, end in halves:
            rows = end - start
            block = q[:, :, :, start:end].reshape(b, kv, groups * rows, d)
            scores = torch.matmul(block, key[:, :, :end].transpose(-1, -2))  # [b, kv, groups * rows, end]
            scores.view(b, kv, groups, rows, end).add_(_causal_bias(start, end, scores.dtype, scores.device))
            p = torch.softmax(scores, dim=-1)  # fp32 arithmetic inside, stored in the compute dtype
            outs.append(torch.matmul(p, value[:, :, :end]).view(b, kv, groups, rows, d))
            probs.append(p)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)
        # the inputs are saved, not the scaled view q: torch.compile (train.compile) traces this function into a
        # layer's graph only when nothing saved aliases an intermediate; backward rescales (one small multiply)
        ctx.save_for_backward(query, key, value, *probs)
        ctx.scale, ctx.halves = scale, halves
        return out.view(b, h, t, d)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        query, key, value, *probs = ctx.saved_tensors
        b, h, t, d = query.shape
        kv = key.shape[1]
        groups = h // kv
        q = (query * ctx.scale).view(b, kv, groups, t, d)
        grad5 = grad_out.reshape(b, kv, groups, t, d)
        grad_q = torch.empty_like(q)
        grad_k = grad_v = None
        for (start, end), p in zip(ctx.halves, probs):
            rows = end - start
            g = grad5[:, :, :, start:end].reshape(b, kv, groups * rows, d)
            block = q[:, :, :, start:end].reshape(b, kv, groups * rows, d)
            dv = torch.matmul(p.transpose(-1, -2), g)  # sums over the groups sharing a KV head
            ds = torch._softmax_backward_data(torch.matmul(g, value[:, :, :end].transpose(-1, -2)), p, -1, p.dtype)
            grad_q[:, :, :, start:end] = torch.matmul(ds, key[:, :, :end]).view(b, kv, groups, rows, d)
            dk = torch.matmul(ds.transpose(-1, -2), block)
            if grad_k is None:
                grad_k, grad_v = dk.float(), dv.float()
                if end < t:
                    pad = (0, 0, 0, t - end)
                    grad_k, grad_v = F.pad(grad_k, pad), F.pad(grad_v, pad)
            else:
                grad_k[:, :, :end] += dk
                grad_v[:, :, :end] += dv
        return ((grad_q * ctx.scale).view(b, kv * groups, t, d), grad_k.to(key.dtype), grad_v.to(value.dtype), None)


_BIASES: dict[tuple, Tensor] = {}


def _causal_bias(start: int, end: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[end - start, end] additive mask of queries start..end-1 over keys 0..end-1: 0 where a key is visible."""
    key = (start, end, dtype, str(device))
    if torch.compiler.is_compiling():  # traced into the graph, where it is a constant: no cache to keep
        return _visible_bias(start, end, dtype, device)
    if key not in _BIASES:
        if len(_BIASES) > 64:
            _BIASES.clear()
        _BIASES[key] = _visible_bias(start, end, dtype, device)
    return _BIASES[key]


def _visible_bias(start: int, end: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    visible = torch.arange(end, device=device)[None, :] <= torch.arange(start, end, device=device)[:, None]
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, float("-inf"))


def keeps_probabilities(query: Tensor, key: Tensor, dropout: float) -> bool:
    """Whether `causal_attention` takes the probabilities path for these inputs."""
    b, h, t, _ = query.shape
    return (query.device.type == "cpu" and torch.is_grad_enabled() and dropout == 0.0
            and (query.requires_grad or key.requires_grad) and key.shape[2] == t and t <= MAX_TOKENS
            and b * h * t * t <= MAX_PROBS and h % key.shape[1] == 0
            and query.dtype == key.dtype and query.dtype in (torch.float32, torch.bfloat16))


def causal_attention(query: Tensor, key: Tensor, value: Tensor, scale: float | None = None,
                     dropout: float = 0.0) -> Tensor:
    """Causal attention of [b, h, t, d] queries over [b, kv, t, d] keys/values (grouped when kv < h), [b, h, t, d]."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if keeps_probabilities(query, key, dropout):
        return _CausalAttention.apply(query, key, value, scale)
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, dropout_p=dropout, scale=scale,
                                          enable_gqa=query.shape[1] != key.shape[1])


def plain_causal(module: torch.nn.Module, tokens: int, kwargs: dict) -> bool:
    """Whether a layer's call is plain causal self-attention that `causal_attention` computes exactly (no soft
    capping, no attention sinks, no sliding window shorter than the pass)."""
    window = kwargs.get("sliding_window")
    return (bool(getattr(module, "is_causal", True)) and kwargs.get("softcap") is None
            and kwargs.get("s_aux") is None and (window is None or window >= tokens))


def causal_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                   attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-interface signature: [b, heads, t, d] inputs -> [b, t, heads, d]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or query.shape[2] != key.shape[2] \
            or not plain_causal(module, query.shape[2], kwargs):
        return sdpa_attention_forward(module, query, key, value, sdpa_mask(attention_mask, query, key),
                                      dropout=dropout, scaling=scaling, **kwargs)
    dropout = dropout if module.training else 0.0
    return causal_attention(query, key, value, scaling, dropout).transpose(1, 2).contiguous(), None


def sdpa_mask(attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """The [b, 1, q, kv] causal (+ padding) mask SDPA takes, the queries being the last q keys; None when plain
    causal attention over equal lengths says it all."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.ndim == 4:
        return attention_mask
    if attention_mask is None and q_len == kv_len:
        return None
    kv = torch.arange(kv_len, device=query.device)
    q = torch.arange(q_len, device=query.device) + (kv_len - q_len)
    mask = (kv[None, :] <= q[:, None])[None, None].expand(query.shape[0], 1, q_len, kv_len)
    return mask if attention_mask is None else mask & attention_mask[:, None, None, -kv_len:].bool()


def switch_attention(model: torch.nn.Module, name: str, forward: Any, mask_function: Any = None) -> bool:
    """Register `forward` as attention implementation `name` in transformers' interface (with `mask_function` for
    its masks; without one the model hands it the raw 2D mask) and switch a model whose attention is SDPA to it;
    whether it was switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(name, forward)
    if mask_function is not None:
        AttentionMaskInterface.register(name, mask_function)
    model.set_attn_implementation(name)
    return True


def use_cpu_attention(model: torch.nn.Module) -> bool:
    """Switch a model whose attention is SDPA to `tuneforge_causal` (for runs on the CPU); whether it was switched.
    Masks are built as for SDPA: none when the pass is plain causal (then the probabilities path can run), a 4D
    mask otherwise (padding, a KV cache in generation), which goes to SDPA with it."""
    from transformers.masking_utils import sdpa_mask as transformers_sdpa_mask

    return switch_attention(model, NAME, causal_forward, transformers_sdpa_mask)
