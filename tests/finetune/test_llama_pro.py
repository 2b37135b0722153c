"""LLaMA-Pro: `tuneforge expand` adds zero-output blocks (same function), and finetune.llama_pro trains exactly
those blocks (LLaMA-Factory's use_llama_pro with freeze_trainable_layers = num_expand)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.finetune.conftest import logits, train_in_process
from tuneforge.cli.main import main
from tuneforge.config import load


@pytest.fixture(scope="module")
def expanded_dir(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("expanded") / "pro"
    assert main(["expand", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
                 "--num_expand", "2"]) == 0
    return out


def test_expanded_model_computes_the_same_logits(expanded_dir, tiny_model_dir):
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    expanded = AutoModelForCausalLM.from_pretrained(expanded_dir).eval()
    assert json.loads((expanded_dir / "config.json").read_text())["num_hidden_layers"] == 4
    assert (expanded_dir / "model.safetensors").is_file() and (expanded_dir / "tokenizer.json").is_file()
    layers = expanded.model.layers
    assert torch.equal(layers[1].self_attn.q_proj.weight, layers[0].self_attn.q_proj.weight)  # a copy of layer 0
    assert not layers[1].mlp.down_proj.weight.any() and not layers[3].self_attn.o_proj.weight.any()
    ids = torch.tensor([[1, 20, 300, 4000, 5, 60, 7]])
    assert torch.allclose(logits(expanded, ids), logits(original, ids), atol=1e-5)


def trained_layers(names) -> set[int]:
    return {int(re.search(r"\.layers\.(\d+)\.", n).group(1)) for n in names if ".layers." in n}


def test_freeze_with_llama_pro_trains_exactly_the_added_blocks(make_cfg, expanded_dir):
    assert load(None, [], {"use_llama_pro": True}).finetune.llama_pro is True
    cfg = make_cfg(f"model.path={expanded_dir}", "finetune.method=freeze", "finetune.freeze.trainable_layers=2",
                   "finetune.llama_pro=true", "train.learning_rate=5e-2")
    model, before, _ = train_in_process(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach().float(), before[n])}
    assert trained_layers(trainable) == {1, 3} and all(".layers." in n for n in trainable)
    assert moved <= trainable and "model.layers.1.self_attn.q_proj.weight" in moved  # moves once o_proj is not 0
    assert "model.layers.3.mlp.down_proj.weight" in moved


def test_lora_with_llama_pro_adapts_only_the_added_blocks(make_cfg, expanded_dir):
    from tuneforge.run import load_for_training

    cfg = make_cfg(f"model.path={expanded_dir}", "finetune.llama_pro=true", "finetune.freeze.trainable_layers=2")
    model = load_for_training(cfg, "fp32")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained_layers(trainable) == {1, 3} and all("lora_" in n for n in trainable)
