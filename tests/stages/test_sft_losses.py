"""sft.loss dft / eaft / asft (LLaMA-Factory's use_dft_loss / use_eaft_loss / use_asft_loss): each equals the
formula computed with plain torch over the model's full logits (value and every parameter's gradient)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tests.train.conftest import train_in_process
from tuneforge.config import load
from tuneforge.config.schema import SFTConfig
from tuneforge.errors import ConfigError
from tuneforge.stages import causal_lm
from tuneforge.stages.causal_lm import SFTStage
from tuneforge.stages.reference import Reference
from tuneforge.train.losses import token_kl, topk_entropy

VOCAB = 48


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config).double()


def tiny_batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, :2] = -100
    labels[1, 7:] = -100  # right padding
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def plain_sum(model, batch, loss: str, alpha: float, ref_model=None) -> torch.Tensor:
    """LLaMA-Factory's per-token formulas (train/trainer_utils.py) over full logits, summed over trained tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    ce = F.cross_entropy(logits[keep], labels[keep], reduction="none")
    if loss == "dft":
        return (ce * torch.exp(-ce).detach()).sum()
    if loss == "eaft":
        top = logits[keep].detach().topk(20, dim=-1).values
        logp = top - torch.logsumexp(top, -1, keepdim=True)
        entropy = -(logp.exp() * logp).sum(-1)
        return (ce * (entropy / 3.0) ** alpha).sum()
    with torch.no_grad():
        ref_logits = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    kl = F.kl_div(F.log_softmax(logits[keep], -1), F.softmax(ref_logits[keep].double(), -1), reduction="none").sum(-1)
    return (ce * torch.exp(-ce).detach()).sum() + alpha * kl.sum()


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("loss,alpha", [("dft", 0.0), ("eaft", 0.7), ("asft", 0.3)])
def test_loss_and_gradients_equal_the_plain_formula(loss, alpha, fused, monkeypatch):
    if not fused:  # heads with soft-capping / scaling take the model's own logits
        monkeypatch.setattr(causal_lm, "uses_fused_head", lambda lm: False)
    model, batch = tiny_llama(0), tiny_batch()
    settings = SFTConfig(loss=loss, eaft_alpha=alpha if loss == "eaft" else 1.0,
                         asft_alpha=alpha if loss == "asft" else 0.1)
    stage = SFTStage(0, settings)
    ref_model = tiny_llama(1).requires_grad_(False) if loss == "asft" else None
    if ref_model is not None:
        stage.reference = Reference("separate", "a different tiny model", ref_model)
    out = stage.loss(model, batch)
    out.loss_sum.backward()
    ours = grads(model)
    expected = plain_sum(model, batch, loss, alpha, ref_model)
    expected.backward()
    theirs = grads(model)
    assert int(out.units) == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(out.loss_sum.double(), expected, atol=1e-5)
    for name in ours:  # the head trains too (full tuning): its gradient comes from the fused backward
        assert torch.allclose(ours[name], theirs[name], atol=1e-6), name
    assert set(out.metrics) == ({"ce", "kl"} if loss == "asft" else {"ce"})


def test_evaluation_reports_plain_cross_entropy():
    model, batch = tiny_llama(0), tiny_batch()
    with torch.no_grad():
        out = SFTStage(0, SFTConfig(loss="dft")).loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    expected = F.cross_entropy(logits[labels != -100], labels[labels != -100], reduction="sum")
    assert torch.allclose(out.loss_sum.double(), expected, atol=1e-6)
    assert "accuracy" in out.metrics


def test_fused_kl_and_entropy_match_autograd_with_a_trained_head():
    torch.manual_seed(0)
    hidden = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    ref_hidden, ref_weight = torch.randn(23, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    g = torch.randn(23, dtype=torch.float64)
    (token_kl(hidden, weight, ref_hidden, ref_weight, chunk=5) * g).sum().backward()
    ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logq = (ref_hidden @ ref_weight.T).log_softmax(-1)
    expected = (logq.exp() * (logq - (hidden @ weight.T).log_softmax(-1))).sum(-1)
    (expected * g).sum().backward()
    assert torch.allclose(ours[0], hidden.grad) and torch.allclose(ours[1], weight.grad, atol=1e-5)  # fp32 sums
    top = (hidden @ weight.T).detach().topk(20, -1).values.softmax(-1)
    assert torch.allclose(topk_entropy(hidden, weight, 20, chunk=7).double(), -(top * top.log()).sum(-1))


def test_llamafactory_keys_map_onto_the_sft_section():
    cfg = load(None, [], {"use_dft_loss": True})
    assert cfg.sft.loss == "dft"
    cfg = load(None, [], {"use_eaft_loss": "true", "eaft_alpha": "0.5"})
    assert (cfg.sft.loss, cfg.sft.eaft_alpha) == ("eaft", 0.5)
    cfg = load(None, [], {"use_asft_loss": True, "asft_alpha": 0.2, "use_dft_loss": False})
    assert (cfg.sft.loss, cfg.sft.asft_alpha) == ("asft", 0.2)
    with pytest.raises(ConfigError, match="applies to stage sft"):
        load(None, ["stage=pt", "sft.loss=dft"])


@pytest.mark.parametrize("loss", ["dft", "asft"])  # eaft weighs ~1 everywhere on random weights
def test_a_short_full_run_learns(make_cfg, loss):
    # From random weights p(y) ~ 1 / vocab, so DFT's gradient is tiny next to ASFT's KL anchor: a small alpha here.
    cfg = make_cfg(f"sft.loss={loss}", "sft.asft_alpha=1e-4", "finetune.method=full", "data.max_samples=4",
                   "train.max_steps=6", "train.learning_rate=3e-3", "train.scheduler=constant")
    train_in_process(cfg)
    records = metrics(cfg)
    assert records[-1]["ce"] < records[0]["ce"] - 0.5  # the cross-entropy of the trained tokens falls
    if loss == "asft":  # the reference (a frozen copy) is where training started
        assert records[0]["kl"] < 1e-6 < 1e-3 < records[-1]["kl"]


def test_asft_with_lora_anchors_to_the_base_with_the_adapter_off(make_cfg):
    cfg = make_cfg("sft.loss=asft", "train.max_steps=2", "train.learning_rate=5e-2")
    train_in_process(cfg)
    records = metrics(cfg)
    assert records[0]["kl"] < 1e-6 < records[1]["kl"]


def metrics(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]
