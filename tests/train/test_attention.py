"""CPU training attention (`models/attention.py`): the probabilities path computes what SDPA computes, forward and
backward, with grouped KV heads and with the split query halves of longer passes; everything else goes to SDPA;
a CPU run's model uses it, and the loop's step gives the SDPA step's loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuneforge.models import attention
from tuneforge.models.attention import causal_attention, keeps_probabilities


def inputs(b: int, heads: int, kv: int, t: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, t, 16, generator=gen).to(dtype).requires_grad_() for n in (heads, kv, kv))
    grad = torch.randn(b, heads, t, 16, generator=gen).to(dtype)
    return q, k, v, grad


def reference(q, k, v, grad):
    """Causal attention written out in fp64: repeat the KV heads, full scores, -inf above the diagonal."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    keys, values = k64.repeat_interleave(groups, 1), v64.repeat_interleave(groups, 1)
    t = q.shape[2]
    scores = q64 @ keys.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ values
    out.backward(grad.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def ours(q, k, v, grad, path=causal_attention):
    out = path(q, k, v)
    out.backward(grad)
    result = out.detach(), q.grad, k.grad, v.grad
    q.grad = k.grad = v.grad = None
    return result


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("b,heads,kv,t", [(2, 4, 2, 37), (1, 6, 2, 400), (2, 3, 3, 130), (1, 2, 1, 1)])
def test_probabilities_path_equals_causal_attention_in_fp32(b, heads, kv, t):
    q, k, v, grad = inputs(b, heads, kv, t, torch.float32)
    assert keeps_probabilities(q, k, 0.0)
    if t == 400:
        assert t >= attention.SPLIT_FROM  # this case runs the two query halves (the first never scores keys >= 200)
    expected = reference(q, k, v, grad)
    for got, want, name in zip(ours(q, k, v, grad), expected, ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("t", [200, 512])
def test_bf16_is_as_close_to_exact_as_sdpa(t):
    """bf16: every output and gradient lies within twice SDPA's own bf16 distance from the exact result."""
    q, k, v, grad = inputs(2, 6, 2, t, torch.bfloat16, seed=1)
    expected = reference(q, k, v, grad)
    mine, theirs = ours(q, k, v, grad), ours(q, k, v, grad, sdpa)
    for got, base, want, name in zip(mine, theirs, expected, ("out", "dq", "dk", "dv")):
        scale = want.abs().max()
        err, base_err = (got.double() - want).abs().max() / scale, (base.double() - want).abs().max() / scale
        assert err <= 2 * base_err + 1e-3, (name, float(err), float(base_err))


def test_everything_else_goes_to_sdpa(monkeypatch):
    q, k, v, _ = inputs(1, 4, 2, 64, torch.float32)
    assert keeps_probabilities(q, k, 0.0)
    assert not keeps_probabilities(q, k, 0.1)  # dropout
    with torch.no_grad():
        assert not keeps_probabilities(q, k, 0.0)  # inference: SDPA's forward is the faster one
    assert not keeps_probabilities(q.detach(), k.detach(), 0.0)  # nothing needs a gradient
    long = inputs(1, 2, 1, attention.MAX_TOKENS + 1, torch.float32)
    assert not keeps_probabilities(long[0], long[1], 0.0)  # longer passes
    assert not keeps_probabilities(q.half(), k.half(), 0.0)
    monkeypatch.setattr(attention, "MAX_PROBS", 4 * 64 * 64 - 1)
    assert not keeps_probabilities(q, k, 0.0)  # probabilities too many to keep
    called = []
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **kw: called.append(kw) or a[0])
    causal_attention(q, k, v, dropout=0.0)
    assert called and called[0]["is_causal"] and called[0]["enable_gqa"]


def test_only_plain_causal_layers_take_it():
    class Layer(torch.nn.Module):
        is_causal = True

    layer = Layer()
    assert attention.plain_causal(layer, 64, {"sliding_window": None})
    assert attention.plain_causal(layer, 64, {"sliding_window": 64})  # a window as long as the pass: no effect
    assert not attention.plain_causal(layer, 64, {"sliding_window": 63})
    assert not attention.plain_causal(layer, 64, {"softcap": 30.0})
    assert not attention.plain_causal(layer, 64, {"s_aux": torch.zeros(1)})
    layer.is_causal = False
    assert not attention.plain_causal(layer, 64, {})


def test_a_cpu_run_uses_it_and_the_step_matches_sdpa(make_cfg):
    """The loop's loss module on the tiny model (4 heads over 2 KV heads): the same loss and LoRA gradients as
    transformers' SDPA path, for a padded batch of different lengths; a neat-packed run keeps per-segment
    attention (a compiled run keeps this one: test_fast_paths.test_compiled_layers_...)."""
    from tuneforge.run import prepare
    from tuneforge.stages.base import unwrap_causal_lm
    from tuneforge.train import loop

    job = prepare(make_cfg("finetune.method=lora", "finetune.lora.rank=4", "train.precision=fp32"))
    lm = unwrap_causal_lm(job.model)
    assert lm.config._attn_implementation == attention.NAME
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in job.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    rows = sorted(job.train_rows, key=lambda r: len(r["input_ids"]))[::4][:4]
    batch = job.stage.collate(rows)
    module = loop.LossModule(job.model, job.stage)
    calls = []
    real = attention._CausalAttention.apply
    attention._CausalAttention.apply = lambda *a: calls.append(a[0].shape) or real(*a)
    try:
        results = []
        for impl in (attention.NAME, "sdpa"):
            lm.set_attn_implementation(impl)
            job.model.zero_grad(set_to_none=True)
            loss_sum, units, _ = module(batch)
            (loss_sum / units).backward()
            results.append((float(loss_sum.detach() / units),
                            {n: p.grad.clone() for n, p in job.model.named_parameters() if p.requires_grad}))
    finally:
        attention._CausalAttention.apply = real
    assert len(calls) == 2  # one call per layer, the probabilities path, and none under "sdpa"
    (loss, grads), (plain_loss, plain_grads) = results
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=1e-4)
    # generation (left padding, a KV cache) goes to SDPA with transformers' masks: the same greedy tokens
    prompts = torch.tensor([[job.tokenizer.pad_token_id] * 3 + rows[0]["input_ids"][:5], rows[1]["input_ids"][:8]])
    mask = (torch.arange(8)[None] >= torch.tensor([[3], [0]])).long()
    answers = []
    for impl in (attention.NAME, "sdpa"):
        lm.set_attn_implementation(impl)
        with torch.no_grad():
            answers.append(job.model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=6,
                                              do_sample=False, pad_token_id=job.tokenizer.pad_token_id).tolist())
    assert answers[0] == answers[1]
    asked = prepare(make_cfg("finetune.method=lora", "model.attn_implementation=sdpa"))
    assert unwrap_causal_lm(asked.model).config._attn_implementation == "sdpa"  # asked for by name: kept
    neat = prepare(make_cfg("finetune.method=lora", "data.neat_packing=true", "data.cutoff_len=256"))
    assert unwrap_causal_lm(neat.model).config._attn_implementation == "tuneforge_segments"
