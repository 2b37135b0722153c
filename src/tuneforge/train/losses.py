"""Log-probabilities of target tokens through the output head, computed chunk by chunk.

The output projection and the log-softmax are fused: each chunk's logits exist only inside forward, where the
gradient with respect to the hidden states is computed at once. A [tokens, vocab] logits tensor is never kept
for backward. Every stage takes its log-probs from here: SFT sums them (cross-entropy), DPO/KTO/RM-free stages sum
or average them per sequence, PPO/GRPO use them per token.

The head weight's gradient, when the head trains, is computed in forward too when the caller promises a uniform
upstream gradient (SFT: every token weighs the same); otherwise backward recomputes the chunk logits once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK_TOKENS = 1024
SMALLEST_CHUNK = 64  # chunks are CHUNK_TOKENS / 2^k rows, at least this many (the last one padded up to it)


def chunk_spans(n: int, chunk: int) -> list[tuple[int, int]]:
    """Row spans [start, end) covering n rows in chunks of `chunk`, chunk/2, ... down to SMALLEST_CHUNK rows; the
    last span may end up to SMALLEST_CHUNK - 1 rows past n (the caller pads them with zeros and drops them).

    A CPU matmul library (oneDNN) builds a kernel per new shape, ~10-30 ms for an output head's matmul; chunks
    of a few fixed sizes are built once per run instead of once per step."""
    spans, start = [], 0
    size = chunk
    while start < n:
        while size > SMALLEST_CHUNK and n - start < size:
            size //= 2
        spans.append((start, start + size))
        start += size
    return spans


def _rows(tensor: Tensor, start: int, end: int) -> Tensor:
    """tensor[start:end], zero-padded at the bottom when end is past its rows."""
    part = tensor[start:end]
    missing = end - start - part.shape[0]
    return part if missing == 0 else torch.cat([part, part.new_zeros((missing, *part.shape[1:]))])


class _LinearTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, compute_dtype: torch.dtype, chunk: int,
                uniform: bool) -> Tensor:
        # hidden [n, h], weight [v, h], targets [n] -> log p(target) per row, fp32 [n]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            eager_weight = ctx.needs_input_grad[1] and uniform
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if eager_weight else None
            n = hidden.shape[0]
            for start, end in chunk_spans(n, chunk):
                h = _rows(hidden, start, end).to(compute_dtype)  # [c, h]; rows past n are zeros
                neg_grad_logits, logp = _chunk_grad(h, w, _rows(targets, start, end))
                rows = min(end, n) - start
                logps[start:start + rows] = logp[:rows]
                if grad_hidden is not None:
                    grad_hidden[start:start + rows] = (neg_grad_logits @ w)[:rows].neg_().to(hidden.dtype)
                if grad_weight is not None:  # (zero rows of h add nothing)
                    grad_weight -= (neg_grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight, hidden if ctx.needs_input_grad[1] else None,
                              weight if ctx.needs_input_grad[1] else None, targets)
        ctx.compute_dtype, ctx.chunk, ctx.weight_dtype = compute_dtype, chunk, weight.dtype
        return logps

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight, hidden, weight, targets = ctx.saved_tensors
        g = grad_output.float()  # [n]
        gh = (grad_hidden * g[:, None].to(grad_hidden.dtype)) if grad_hidden is not None else None
        gw = None
        if weight is not None:
            if grad_weight is not None and bool((g == g[0]).all()):
                gw = grad_weight * g[0]
            else:  # per-token upstream weights: recompute each chunk's softmax once
                gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                w = weight.to(ctx.compute_dtype)
                with torch.autocast(hidden.device.type, enabled=False):
                    for start, end in chunk_spans(hidden.shape[0], ctx.chunk):
                        h = _rows(hidden, start, end).to(ctx.compute_dtype)
                        neg_grad_logits, _ = _chunk_grad(h, w, _rows(targets, start, end))
                        scaled = neg_grad_logits * _rows(g, start, end)[:, None].to(neg_grad_logits.dtype)
                        gw -= (scaled.T @ h).float()
            gw = gw.to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def _chunk_grad(h: Tensor, w: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """softmax - one_hot(y) (= -d log p(y) / d logits) in the compute dtype, and log p(y) in fp32.

    One fused log-softmax reads the compute-dtype logits and writes fp32 log-probs; the probabilities overwrite
    them in place. The sign is left to the callers' [c, h] products, a vocabulary-sized pass fewer."""
    logp = torch.log_softmax(h @ w.T, dim=-1, dtype=torch.float32)  # [c, v]
    target = logp.gather(1, y[:, None]).squeeze(1)
    probs = logp.exp_()
    probs[torch.arange(len(y), device=y.device), y] -= 1
    return probs.to(h.dtype), target


@dataclass
class TokenLogps:
    """Log-probs of trained tokens, flattened over a batch, with the row each token belongs to."""

    values: Tensor  # [n] fp32
    rows: Tensor  # [n] row index in the batch
    batch: int  # number of rows
    hits: Tensor | None = None  # [n] bool: the target was the argmax (evaluation only)

    def sum(self, weights: Tensor | None = None) -> Tensor:
        """Per-row sum of (optionally weighted) log-probs, [batch]."""
        values = self.values if weights is None else self.values * weights
        return torch.zeros(self.batch, dtype=values.dtype, device=values.device).index_add(0, self.rows, values)

    def count(self) -> Tensor:
        """Trained tokens per row, [batch] (fp32)."""
        ones = torch.ones_like(self.values)
        return torch.zeros(self.batch, dtype=ones.dtype, device=ones.device).index_add(0, self.rows, ones)

    def mean(self) -> Tensor:
        """Per-row mean log-prob per trained token, [batch]; 0 for rows with none."""
        return self.sum() / self.count().clamp(min=1)


def token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, uniform_grad: bool = False,
                chunk: int = CHUNK_TOKENS) -> tuple[Tensor, Tensor | None]:
    """log p(targets | hidden) per row, [n] fp32, with the head matmul in the autocast dtype when autocast is on.

    Under no_grad (evaluation) no gradient of any kind is computed, and argmax hits come back too.
    """
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    if hidden.shape[0] == 0:
        return (hidden.sum(-1) * 0.0).float(), None
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearTokenLogps.apply(hidden, weight, targets, dtype, chunk, uniform_grad), None
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        w = weight.to(dtype)
        logps, hits = [], []
        n = hidden.shape[0]
        for start, end in chunk_spans(n, chunk):
            rows = min(end, n) - start
            logits = (_rows(hidden, start, end).to(dtype) @ w.T)[:rows]
            y = targets[start:start + rows]
            logps.append(torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(1, y[:, None]).squeeze(1))
            hits.append(logits.argmax(-1) == y)
        return torch.cat(logps), torch.cat(hits)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = CHUNK_TOKENS) -> Tensor:
    """Sum over rows of CE(hidden @ weight.T, targets) (fp32 scalar); the head's gradient computed in forward."""
    values, _ = token_logps(hidden, weight, targets, uniform_grad=True, chunk=chunk)
    return -values.sum()


def topk_entropy(hidden: Tensor, weight: Tensor, k: int = 20, chunk: int = CHUNK_TOKENS) -> Tensor:
    """Entropy of the softmax over each row's k largest logits of hidden @ weight.T, [n] fp32, no gradient
    (EAFT's per-token weight: a cheap estimate of how unsure the model is at that position)."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], chunk):
            out[start:start + chunk] = logits_topk_entropy((hidden[start:start + chunk].to(dtype) @ w.T).float(), k)
    return out


def logits_topk_entropy(logits: Tensor, k: int = 20) -> Tensor:
    """topk_entropy from logits [n, v] that already exist, [n] fp32, no gradient."""
    with torch.no_grad():
        top = logits.detach().float().topk(min(k, logits.shape[-1]), dim=-1).values  # [n, k]
        logp = top.log_softmax(-1)
        return -(logp.exp() * logp).sum(-1)


class _LinearTokenKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor,
                compute_dtype: torch.dtype, chunk: int) -> Tensor:
        # KL(q_ref || p) per row, fp32 [n]; d KL / d logits = softmax(p) - q, so d KL / d hidden is found here.
        with torch.autocast(hidden.device.type, enabled=False):
            w, rw = weight.to(compute_dtype), ref_weight.to(compute_dtype)
            kl = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(compute_dtype)
                grad_logits, kl[start:start + chunk] = _chunk_kl_grad(h, w, ref_hidden[start:start + chunk], rw)
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk] = (grad_logits @ w).to(hidden.dtype)
        keep = ctx.needs_input_grad[1]  # the head trains: backward recomputes each chunk once for its gradient
        ctx.save_for_backward(grad_hidden, hidden if keep else None, weight if keep else None,
                              ref_hidden if keep else None, ref_weight if keep else None)
        ctx.compute_dtype, ctx.chunk = compute_dtype, chunk
        return kl

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, hidden, weight, ref_hidden, ref_weight = ctx.saved_tensors
        g = grad_output.float()  # [n]
        gh = grad_hidden * g[:, None].to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = None
        if weight is not None:
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            w, rw = weight.to(ctx.compute_dtype), ref_weight.to(ctx.compute_dtype)
            with torch.autocast(hidden.device.type, enabled=False):
                for start in range(0, hidden.shape[0], ctx.chunk):
                    h = hidden[start:start + ctx.chunk].to(ctx.compute_dtype)
                    grad_logits, _ = _chunk_kl_grad(h, w, ref_hidden[start:start + ctx.chunk], rw)
                    gw += ((grad_logits * g[start:start + ctx.chunk, None].to(grad_logits.dtype)).T @ h).float()
            gw = gw.to(weight.dtype)
        return gh, gw, None, None, None, None


def _chunk_kl_grad(h: Tensor, w: Tensor, ref_h: Tensor, ref_w: Tensor) -> tuple[Tensor, Tensor]:
    """d KL(q || p) / d logits (= softmax(p) - q) in the compute dtype, and the KL per row in fp32."""
    logp = (h @ w.T).float().log_softmax(-1)  # [c, v]
    logq = (ref_h.to(ref_w.dtype) @ ref_w.T).float().log_softmax(-1)
    q = logq.exp()
    kl = (q * (logq - logp)).sum(-1)
    return (logp.exp_() - q).to(h.dtype), kl


def token_kl(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor,
             chunk: int = CHUNK_TOKENS) -> Tensor:
    """KL(reference || policy) of the full next-token distributions per row, [n] fp32, with gradients to the
    policy's hidden states and head only; the reference's hidden [n, h] and head [v, h] carry none."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearTokenKL.apply(hidden, weight, ref_hidden, ref_weight, dtype, chunk)
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        w, rw = weight.to(dtype), ref_weight.to(dtype)
        parts = [_chunk_kl_grad(hidden[s:s + chunk].to(dtype), w, ref_hidden[s:s + chunk], rw)[1]
                 for s in range(0, hidden.shape[0], chunk)]
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
