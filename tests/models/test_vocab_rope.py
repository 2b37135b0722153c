"""model.rope_scaling and the vocabulary keys (add_tokens, add_special_tokens, resize_vocab), with LLaMA-Factory's
meanings: RoPE factor ceil(cutoff_len / trained positions); new embedding rows at the mean plus noise; LoRA then
trains and saves the embeddings, and chat loads the run's tokenizer and rows."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tuneforge.config import load
from tuneforge.config.schema import ModelConfig
from tuneforge.errors import ConfigError
from tuneforge.models.load import fit_vocab, load_model, load_tokenizer

from ..conftest import train_tiny_run

IDS = torch.arange(200, 264)[None, :]  # 64 tokens


def last_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits[0]


@pytest.fixture(scope="module")
def plain_logits(tiny_model_dir):
    return last_logits(load_model(ModelConfig(path=str(tiny_model_dir))))


@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3"])
def test_rope_scaling_follows_the_cutoff_and_changes_far_positions(tiny_model_dir, plain_logits, kind):
    model = load_model(ModelConfig(path=str(tiny_model_dir), rope_scaling=kind), max_length=2500)
    params = model.config.rope_parameters
    assert params["rope_type"] == kind and params["factor"] == 3.0  # ceil(2500 / 1024)
    assert model.config.max_position_embeddings == 3072
    if kind != "linear":
        assert params["original_max_position_embeddings"] == 1024
    if kind == "llama3":
        assert (params["low_freq_factor"], params["high_freq_factor"]) == (1.0, 4.0)
    scaled = last_logits(model)
    assert not torch.allclose(scaled[-1], plain_logits[-1], atol=1e-4)
    if kind == "linear":  # position 0 is not rotated at all, so the first token is unchanged
        assert torch.allclose(scaled[0], plain_logits[0], atol=1e-5)


def test_rope_is_not_scaled_when_the_cutoff_fits_and_doubles_at_inference(tiny_model_dir, plain_logits):
    fits = load_model(ModelConfig(path=str(tiny_model_dir), rope_scaling="linear"), max_length=1024)
    assert fits.config.rope_parameters["rope_type"] == "default"
    assert torch.allclose(last_logits(fits), plain_logits)
    dynamic = load_model(ModelConfig(path=str(tiny_model_dir), rope_scaling="dynamic"))
    assert dynamic.config.rope_parameters["factor"] == 2.0  # LLaMA-Factory's inference factor


def test_lf_keys_map_to_model_settings():
    cfg = load(None, ["rope_scaling=yarn", "add_tokens=<a>,<b>", "add_special_tokens=<c>", "resize_vocab=true",
                      "split_special_tokens=true"])
    assert cfg.model.rope_scaling == "yarn" and cfg.model.add_tokens == ["<a>", "<b>"]
    assert cfg.model.add_special_tokens == ["<c>"] and cfg.model.resize_vocab and cfg.model.split_special_tokens
    with pytest.raises(ConfigError, match="quantized model cannot be resized"):
        load(None, ["add_tokens=<a>", "quantization_bit=4"])
    with pytest.raises(ConfigError, match="init_special_tokens"):
        load(None, ["init_special_tokens=desc_init"])


def test_new_special_tokens_config_adds_its_tokens(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text("'<think_a>': start of a thought\n'<think_b>': end of a thought\n", encoding="utf-8")
    assert load(None, [f"new_special_tokens_config={path}"]).model.add_special_tokens == ["<think_a>", "<think_b>"]


def test_split_special_tokens_tokenizes_their_text(tiny_model_dir):
    text = "<|im_end|>"
    whole = load_tokenizer(ModelConfig(path=str(tiny_model_dir)))(text, add_special_tokens=False).input_ids
    split = load_tokenizer(ModelConfig(path=str(tiny_model_dir), split_special_tokens=True))(
        text, add_special_tokens=False).input_ids
    assert len(whole) == 1 and len(split) > 1


def test_added_tokens_are_single_ids_and_grow_the_embeddings(tiny_model_dir):
    cfg = ModelConfig(path=str(tiny_model_dir), add_tokens=["tuneforge_rocks"], add_special_tokens=["<tool>"])
    tokenizer = load_tokenizer(cfg)
    assert tokenizer("tuneforge_rocks", add_special_tokens=False).input_ids == [49152]  # one id each
    assert tokenizer("say <tool>", add_special_tokens=False).input_ids[-1] == 49153
    assert tokenizer.decode([49152, 49153], skip_special_tokens=True) == "tuneforge_rocks"  # <tool> is special
    model = load_model(cfg)
    old = model.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(0)
    assert fit_vocab(model, tokenizer, cfg) == ["embed_tokens", "lm_head"]
    weight = model.get_input_embeddings().weight.detach()
    assert weight.shape == (49216, 64)  # 49154 rounded up to a multiple of 64
    assert torch.equal(weight[:49152], old)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    noise = weight[49152:] - old.mean(0)  # new rows: mean of the old ones plus N(0, 1/64) noise
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1 / 8) < 0.01
    assert fit_vocab(load_model(cfg), load_tokenizer(ModelConfig(path=str(tiny_model_dir))),
                     dataclasses.replace(cfg, add_tokens=[], add_special_tokens=[])) == []


def test_a_lora_run_with_new_tokens_trains_and_saves_them_and_chat_uses_them(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from tuneforge.chat.engine import load_engine

    run = train_tiny_run(tmp_path / "run", tiny_model_dir, "model.add_special_tokens=[<tool>]")
    saved = AutoTokenizer.from_pretrained(run / "adapter")
    assert saved.convert_tokens_to_ids("<tool>") == 49152
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    embed = next(v for k, v in weights.items() if "embed_tokens" in k)
    assert embed.shape == (49216, 64)
    engine = load_engine(ModelConfig(path=str(tiny_model_dir), adapter_path=[str(run / "adapter")]))
    assert engine.tokenizer("<tool>", add_special_tokens=False).input_ids == [49152]
    loaded = engine.model.get_input_embeddings().weight
    assert torch.allclose(loaded[49152], embed[49152].to(loaded.dtype))
    assert engine.model(input_ids=torch.tensor([[49152, 5]])).logits.shape[-1] == 49216
