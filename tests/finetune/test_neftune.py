"""NEFTune (neftune_noise_alpha): uniform noise of at most alpha / sqrt(length * hidden) on the input embeddings,
in training forwards only."""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tuneforge.config import load
from tuneforge.finetune.neftune import add_neftune


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def test_training_embeddings_are_perturbed_within_the_bound_and_eval_is_untouched():
    model = tiny_llama()
    ids = torch.randint(0, 40, (3, 25))
    clean = model.get_input_embeddings()(ids).detach()
    handle = add_neftune(model, alpha=5.0)
    embed = model.get_input_embeddings()
    model.train()
    noisy = embed(ids)
    bound = 5.0 / math.sqrt(25 * 16)
    diff = (noisy - clean).abs()
    assert diff.max() <= bound + 1e-7
    assert diff.max() > 0.9 * bound and diff.mean() > 0.4 * bound  # uniform on [-bound, bound]: mean |x| = bound / 2
    assert not torch.equal(embed(ids), noisy)  # fresh noise every forward
    model.eval()
    assert torch.equal(embed(ids), clean)
    model.train()
    with torch.no_grad():  # a reference pass through the policy (asft with LoRA) sees clean embeddings
        assert torch.equal(embed(ids), clean)
    handle.remove()
    assert torch.equal(embed(ids), clean)


def test_the_llamafactory_key_reaches_the_training_model(make_cfg):
    from tuneforge.run import load_for_training

    assert load(None, [], {"neftune_noise_alpha": 5}).train.neftune_alpha == 5
    cfg = make_cfg("train.neftune_alpha=5")
    model = load_for_training(cfg, "fp32")
    ids = torch.tensor([[1, 2, 3, 4]])
    model.train()
    embed = model.get_input_embeddings()
    assert not torch.equal(embed(ids), embed(ids))
    model.eval()
    assert torch.equal(embed(ids), embed(ids))
