"""The training step's shortcuts compute what the plain path computes: a right-padded batch runs without its
attention mask, and adapters take their bf16 input as it comes under autocast (peft's cast to fp32 and autocast's
cast back are an exact round trip). Each is compared with the plain path through the loop's own loss module."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tuneforge.stages import base, causal_lm
from tuneforge.train import loop


def step(job, batch, precision: str) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward of the loop's loss module: the loss and every trainable parameter's gradient."""
    module = loop.LossModule(job.model, job.stage)
    job.model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss_sum, units, _ = module(batch)
        (loss_sum / units).backward()
    return float(loss_sum.detach() / units), {n: p.grad.clone() for n, p in job.model.named_parameters() if p.requires_grad}


@pytest.fixture
def lora_job(make_cfg):
    from tuneforge.run import prepare

    def make(precision: str):
        job = prepare(make_cfg("finetune.method=lora", "finetune.lora.rank=4", f"train.precision={precision}"))
        torch.manual_seed(0)
        with torch.no_grad():  # as after some training: lora_B off zero, so lora_A gets gradients too
            for name, param in job.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        rows = sorted(job.train_rows, key=lambda r: len(r["input_ids"]))[::4][:4]  # four different lengths
        batch = job.stage.collate(rows)
        lengths = [len(r["input_ids"]) for r in rows]
        assert len(set(lengths)) > 1 and batch["attention_mask"].sum(-1).tolist() == lengths  # really padded
        return job, batch

    return make


def with_mask_passed(monkeypatch) -> None:
    """The plain path: the padding mask handed to the model as collated."""
    keep = lambda batch: batch.get("attention_mask")  # noqa: E731
    monkeypatch.setattr(base, "model_mask", keep)
    monkeypatch.setattr(causal_lm, "model_mask", keep)


def test_which_masks_are_dropped():
    right = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    assert base.model_mask({"attention_mask": right}) is None
    left = torch.tensor([[1, 1, 1], [0, 1, 1]])  # left padding: the mask changes what real tokens see
    assert base.model_mask({"attention_mask": left}) is left
    holes = torch.tensor([[1, 0, 1]])
    assert base.model_mask({"attention_mask": holes}) is holes
    assert base.model_mask({}) is None


def test_a_right_padded_batch_without_its_mask_gives_the_same_loss_and_gradients(lora_job, monkeypatch):
    job, batch = lora_job("fp32")
    assert base.model_mask(batch) is None  # the production path hands the model no mask for this batch
    loss, grads = step(job, batch, "fp32")
    with monkeypatch.context() as patch:
        with_mask_passed(patch)
        plain_loss, plain_grads = step(job, batch, "fp32")
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain_grads.keys() and len(grads) > 0
    for name in grads:
        scale = plain_grads[name].abs().max().item()
        assert scale > 0, name
        assert (grads[name] - plain_grads[name]).abs().max().item() <= 1e-5 * scale, name


def test_adapters_under_autocast_skip_the_fp32_round_trip_bit_for_bit(lora_job, monkeypatch):
    job, batch = lora_job("bf16")
    copies = []
    original = torch.Tensor.to

    def counting_to(tensor, *args, **kwargs):
        result = original(tensor, *args, **kwargs)
        if result.dtype == torch.float32 and tensor.dtype == torch.bfloat16 and tensor.dim() == 3:
            copies.append(tuple(tensor.shape))  # a [b, t, h] activation upcast
        return result

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    loss, grads = step(job, batch, "bf16")
    ours = len(copies)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "adapter_inputs_as_autocast", lambda *args: contextlib.nullcontext())
        plain_loss, plain_grads = step(job, batch, "bf16")
    plain = len(copies) - ours
    assert loss == plain_loss
    assert all(torch.equal(grads[n], plain_grads[n]) for n in grads)
    # peft upcast every adapter input (2 layers x 7 adapted projections); now none is
    assert plain - ours == 2 * 7, (ours, plain)


def test_adapter_casting_is_off_inside_an_autocast_pass_and_restored_after(lora_job):
    from tuneforge.finetune.methods import adapter_inputs_as_autocast, tuner_layers

    job, _ = lora_job("bf16")
    layers = tuner_layers(job.model)
    assert len(layers) == 2 * 7  # 2 layers x 7 adapted projections
    for given in (layers, None):  # the caller's list, or found here
        with torch.autocast("cpu", dtype=torch.bfloat16), adapter_inputs_as_autocast(job.model, given):
            assert not any(layer.cast_input_dtype_enabled for layer in layers)
        assert all(layer.cast_input_dtype_enabled for layer in layers)
    with adapter_inputs_as_autocast(job.model, layers):  # no autocast: peft's cast is needed, left on
        assert all(layer.cast_input_dtype_enabled for layer in layers)


def counting(forward, calls: list[int]):
    """`forward`, appending to `calls` at each call."""
    return lambda ctx, *args: calls.append(1) or forward(ctx, *args)


def test_compiled_layers_give_the_plain_loss_and_gradients(make_cfg):
    """train.compile compiles every decoder layer in place (dynamo's aot_eager backend here: the same graph
    capture and autograd as inductor without its C++ build) with the CPU attention that keeps probabilities traced
    into the graph; loss and gradients are the uncompiled step's, for two padded batches of different lengths
    (a second shape: the layers are compiled again, with symbolic lengths)."""
    from tuneforge.models import attention
    from tuneforge.run import prepare
    from tuneforge.stages.base import unwrap_causal_lm

    results = []
    for extra in ([], ["train.compile=true", "train.compile_backend=aot_eager"]):
        job = prepare(make_cfg("finetune.method=lora", "finetune.lora.rank=4", "train.precision=fp32", *extra))
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in job.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        lm = unwrap_causal_lm(job.model)
        assert lm.config._attn_implementation == attention.NAME
        assert all((layer._compiled_call_impl is not None) == bool(extra) for layer in lm.get_decoder().layers)
        rows = sorted(job.train_rows, key=lambda r: len(r["input_ids"]))
        batches = [job.stage.collate(rows[:3]), job.stage.collate(rows[-3:])]
        assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
        calls: list[int] = []
        real = attention._CausalAttention.forward
        attention._CausalAttention.forward = staticmethod(counting(real, calls))
        try:
            results.append([step(job, batch, "fp32") for batch in batches])
        finally:
            attention._CausalAttention.forward = staticmethod(real)
        assert calls  # the probabilities path ran (traced once per graph when compiled, every layer when not)
    for (plain_loss, plain_grads), (loss, grads) in zip(*results):
        assert loss == pytest.approx(plain_loss, abs=1e-6)
        assert grads.keys() == plain_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=1e-5)


def test_neat_packed_rows_attend_segment_by_segment_with_the_block_masks_result(make_cfg):
    """neat_packing runs one causal attention call per packed row (no [b, 1, t, t] mask): loss and gradients are
    those of transformers' SDPA path with its block-diagonal mask."""
    from tuneforge.models.segments import NAME
    from tuneforge.run import prepare
    from tuneforge.stages.base import unwrap_causal_lm

    job = prepare(make_cfg("finetune.method=lora", "finetune.lora.rank=4", "train.precision=fp32",
                           "data.neat_packing=true", "data.cutoff_len=256"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in job.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    lm = unwrap_causal_lm(job.model)
    assert lm.config._attn_implementation == NAME
    batch = job.stage.collate(job.train_rows[:2])
    segments = int((batch["position_ids"] == 0).sum())
    assert "attention_mask" not in batch and segments > 2 * 2  # several rows packed per block
    loss, grads = step(job, batch, "fp32")
    lm.set_attn_implementation("sdpa")
    plain_loss, plain_grads = step(job, batch, "fp32")
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=1e-4)
