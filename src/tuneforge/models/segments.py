"""Attention for neat-packed rows: one causal attention call per packed segment instead of one call over the whole
block with a materialised block-diagonal [b, 1, t, t] mask (which also keeps SDPA off its causal fast path). Each
call is `attention.causal_attention` (probabilities kept for backward on a CPU, else SDPA's causal kernel).

Registered in transformers' AttentionInterface as `tuneforge_segments`; with no mask function registered for it,
the model hands the attention the raw inputs (no 4D mask), and the position ids, which restart at 0 for every
packed row. Anything else (a padding mask, a KV cache) goes to transformers' own SDPA path with a mask built here.
"""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.models.attention import causal_attention, plain_causal, sdpa_mask, switch_attention

NAME = "tuneforge_segments"


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """[b, heads, t, d] query and [b, kv_heads, t, d] key/value -> [b, t, heads, d]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None or position_ids is None or q_len != kv_len \
            or not plain_causal(module, q_len, kwargs):
        return sdpa_attention_forward(module, query, key, value, sdpa_mask(attention_mask, query, key),
                                      dropout=dropout, scaling=scaling, **kwargs)
    position_ids = position_ids.expand(query.shape[0], -1)
    dropout = dropout if module.training else 0.0
    rows = []
    for row in range(query.shape[0]):
        starts = (position_ids[row] == 0).nonzero().flatten().tolist()
        starts = starts if starts and starts[0] == 0 else [0, *starts]
        ends = [*starts[1:], q_len]
        parts = [causal_attention(query[row:row + 1, :, s:e], key[row:row + 1, :, s:e],
                                  value[row:row + 1, :, s:e], scaling, dropout) for s, e in zip(starts, ends)]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def use_segments(model: torch.nn.Module) -> bool:
    """Switch a model whose attention is SDPA to per-segment attention; whether it was switched."""
    return switch_attention(model, NAME, segment_attention)
