"""q/k/v and gate/up LoRA layers computed as one projection per shared input (finetune/fused.py): the same loss
and gradients as peft's layer-by-layer path with fewer matmuls; the plain path wherever grouping does not apply;
a training run through the loop ends with the layers restored and the same adapters as without grouping."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.train.test_fast_paths import step
from tuneforge.finetune import fused


def job_with(make_cfg, *extra: str):
    from tuneforge.run import prepare

    job = prepare(make_cfg("finetune.method=lora", "finetune.lora.rank=4", *extra))
    torch.manual_seed(0)
    with torch.no_grad():  # as after some training: lora_B off zero, so lora_A gets gradients too
        for name, param in job.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    rows = sorted(job.train_rows, key=lambda r: len(r["input_ids"]))[::4][:4]
    return job, job.stage.collate(rows)


@contextlib.contextmanager
def counting_linear(monkeypatch):
    calls = []
    real = torch.nn.functional.linear
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        yield calls


def test_grouped_layers_give_the_plain_loss_and_gradients_with_fewer_matmuls(make_cfg, monkeypatch):
    job, batch = job_with(make_cfg, "train.precision=fp32")
    with counting_linear(monkeypatch) as calls:
        plain_loss, plain_grads = step(job, batch, "fp32")
    plain_calls = len(calls)
    assert fused.fuse_shared_inputs(job.model) == 2 * 2  # q/k/v and gate/up in each of the 2 layers
    with counting_linear(monkeypatch) as calls:
        loss, grads = step(job, batch, "fp32")
    # per layer: 7 adapted projections x (frozen, A, B) = 21 linear calls before; 4 x 3 = 12 grouped
    assert plain_calls - len(calls) == 2 * (21 - 12)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        assert plain_grads[name].abs().max() > 0, name
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=1e-4)


def test_only_the_adapted_members_of_a_group_are_grouped(make_cfg):
    job, batch = job_with(make_cfg, "train.precision=fp32", "finetune.lora.targets=[q_proj,v_proj]")
    plain_loss, plain_grads = step(job, batch, "fp32")
    assert fused.fuse_shared_inputs(job.model) == 2  # q_proj with v_proj in each layer; k_proj stays plain
    loss, grads = step(job, batch, "fp32")
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=1e-4)


def test_bf16_stays_as_close_to_fp32_as_the_plain_path(make_cfg):
    job, batch = job_with(make_cfg, "train.precision=bf16")
    exact_loss, exact = step(job, batch, "fp32")  # the same weights, no autocast: the fp32 result
    plain_loss, plain = step(job, batch, "bf16")
    fused.fuse_shared_inputs(job.model)
    loss, grads = step(job, batch, "bf16")
    assert abs(loss - exact_loss) <= 2 * abs(plain_loss - exact_loss) + 1e-3 * abs(exact_loss)
    for name in grads:
        scale = exact[name].norm()
        err, plain_err = (grads[name] - exact[name]).norm() / scale, (plain[name] - exact[name]).norm() / scale
        assert err <= 2 * plain_err + 1e-3, (name, float(err), float(plain_err))


def test_each_layer_runs_alone_where_grouping_does_not_apply(make_cfg, monkeypatch):
    job, batch = job_with(make_cfg, "train.precision=fp32")
    fused.fuse_shared_inputs(job.model)
    model = job.model
    ids = batch["input_ids"][:1]
    lora_layers = [m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")]
    with counting_linear(monkeypatch) as calls:
        with torch.no_grad():
            grouped = model(input_ids=ids).logits
    grouped_calls = len(calls)
    # adapters disabled (a DPO reference pass): one frozen matmul per group, and exactly the base model's output
    with counting_linear(monkeypatch) as calls, torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    assert len(calls) == 2 * 4 + 1  # q/k/v, o, gate/up, down: one frozen matmul each; the output head
    fused.unfuse(model)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(base, model(input_ids=ids).logits, atol=1e-6, rtol=1e-5)
    with counting_linear(monkeypatch) as calls, torch.no_grad():
        torch.testing.assert_close(grouped, model(input_ids=ids).logits, atol=1e-6, rtol=1e-5)
    assert len(calls) - grouped_calls == 2 * 9 and not hasattr(lora_layers[0], "_shared_input")
    # LoRA dropout while training: every layer alone (each draws its own mask)
    fused.fuse_shared_inputs(model)
    for module in model.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = torch.nn.Dropout(0.1)
    model.train()
    with counting_linear(monkeypatch) as calls, torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == grouped_calls + 2 * 9
    # a weight that no longer lives in the group's tensor (replaced, moved): that group runs layer by layer
    model.eval()
    q = lora_layers[0].base_layer
    q.weight = torch.nn.Parameter(q.weight.detach().clone(), requires_grad=False)
    with counting_linear(monkeypatch) as calls, torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == grouped_calls + (9 - 3)  # one q/k/v group of one layer: 9 calls instead of 3


def test_dora_layers_are_not_grouped(make_cfg, monkeypatch):
    job, batch = job_with(make_cfg, "train.precision=fp32", "finetune.lora.dora=true")
    with counting_linear(monkeypatch) as calls:
        step(job, batch, "fp32")
    plain_calls = len(calls)
    fused.fuse_shared_inputs(job.model)
    with counting_linear(monkeypatch) as calls:
        step(job, batch, "fp32")
    assert len(calls) == plain_calls


def test_a_training_run_groups_the_layers_and_restores_them(make_cfg, monkeypatch, tmp_path):
    """fit() on a CPU groups the layers (the production path) and ends with each weight in storage of its own;
    the trained adapters equal those of a run without grouping."""
    from tests.train.conftest import train_in_process
    from tuneforge.train import loop

    grouped = []
    real = loop.fuse_shared_inputs
    monkeypatch.setattr(loop, "fuse_shared_inputs", lambda model: grouped.append(real(model)))
    model, before, _ = train_in_process(make_cfg("finetune.method=lora", "finetune.lora.rank=4"))
    assert grouped == [4]
    assert not any(hasattr(m, "_shared_input") for m in model.modules())
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)  # no weight shares memory any more (safetensors would refuse)
    monkeypatch.setattr(loop, "fuse_shared_inputs", lambda model: None)
    plain, _, _ = train_in_process(make_cfg("finetune.method=lora", "finetune.lora.rank=4",
                                            f"output.dir={tmp_path / 'plain-run'}"))
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert trained and any(not torch.equal(p.float(), before[n]) for n, p in trained.items())
    for name, param in plain.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(trained[name], param, atol=1e-5, rtol=1e-4)


class Block(torch.nn.Module):
    """q/k/v projections of one input (biases as given) and gate/up of another, as a decoder block calls them."""

    def __init__(self, biases: tuple[bool, bool, bool]):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(8, n, bias=b) for n, b in zip((8, 4, 4), biases))
        self.gate_proj, self.up_proj = torch.nn.Linear(8, 6, bias=False), torch.nn.Linear(8, 6, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return torch.cat([q, k * v, self.gate_proj(x) * self.up_proj(x)], dim=-1)


@pytest.mark.parametrize("biases,groups", [((True, True, True), 2), ((True, False, True), 1)])
def test_biases_are_grouped_only_when_every_layer_has_one(biases, groups):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Block(biases), LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj",
                                                                          "gate_proj", "up_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name or "bias" in name:
            param.data.normal_(0, 0.5)
    x = torch.randn(3, 8)
    plain = model(x)
    assert fused.fuse_shared_inputs(model) == groups  # a q/k/v group with a layer lacking its bias stays apart
    torch.testing.assert_close(model(x), plain, atol=1e-6, rtol=1e-5)
    fused.unfuse(model)
    assert [m.bias is not None for m in (model.base_model.model.q_proj.base_layer,
                                         model.base_model.model.k_proj.base_layer)] == list(biases[:2])
    torch.testing.assert_close(model(x), plain, atol=1e-6, rtol=1e-5)
