"""Each stage x method trains a few steps: trainable parameters move, frozen ones do not."""

from __future__ import annotations

import math

import pytest
import torch

from .conftest import snapshot, train_in_process


def moved(before, after, name):
    return not torch.equal(before[name], after[name])


@pytest.mark.parametrize("stage", ["sft", "pt"])
def test_full_moves_every_weight(make_cfg, stage):
    extra = ["data.dataset=c4_demo"] if stage == "pt" else []
    model, before, _ = train_in_process(make_cfg(f"stage={stage}", "finetune.method=full", *extra))
    after = snapshot(model)
    assert all(p.requires_grad for p in model.parameters())
    assert moved(before, after, "model.layers.0.self_attn.q_proj.weight")
    assert moved(before, after, "model.embed_tokens.weight")


def test_freeze_trains_only_the_last_layer(make_cfg):
    model, before, _ = train_in_process(make_cfg("finetune.method=freeze", "finetune.freeze.trainable_layers=1"))
    after = snapshot(model)
    assert moved(before, after, "model.layers.1.mlp.down_proj.weight")
    for name in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert not moved(before, after, name), name


def test_freeze_first_layer_only_its_mlp_plus_norm(make_cfg):
    model, before, _ = train_in_process(make_cfg(
        "finetune.method=freeze", "finetune.freeze.trainable_layers=-1", "finetune.freeze.trainable_modules=mlp",
        "finetune.freeze.extra_modules=norm"))
    after = snapshot(model)
    assert moved(before, after, "model.layers.0.mlp.up_proj.weight")
    assert moved(before, after, "model.norm.weight")
    assert not moved(before, after, "model.layers.0.self_attn.q_proj.weight")
    assert not moved(before, after, "model.layers.1.mlp.up_proj.weight")


@pytest.mark.parametrize("variant", [[], ["finetune.lora.dora=true"], ["finetune.lora.rslora=true"],
                                     ["finetune.lora.pissa_init=true"], ["finetune.lora.targets=q_proj,v_proj"]])
def test_lora_moves_adapters_only(make_cfg, variant):
    model, before, _ = train_in_process(make_cfg("finetune.method=lora", *variant))
    after = snapshot(model)
    lora = [n for n in after if "lora_" in n]
    assert lora and all(moved(before, after, n) for n in lora if "lora_B" in n)
    base = [n for n in after if "lora_" not in n and "magnitude" not in n]
    assert base and not any(moved(before, after, n) for n in base)
    if variant == ["finetune.lora.targets=q_proj,v_proj"]:
        assert not any("k_proj.lora" in n for n in lora) and any("q_proj.lora" in n for n in lora)


def test_lora_modules_to_save_trains_the_head(make_cfg):
    model, before, _ = train_in_process(make_cfg("finetune.lora.modules_to_save=lm_head"))
    after = snapshot(model)
    saved = [n for n in after if "modules_to_save" in n]
    assert saved and all(moved(before, after, n) for n in saved)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_quantizes_the_base_and_trains_adapters(make_cfg, bits):
    model, before, result = train_in_process(make_cfg(f"model.quantization_bit={bits}", "train.precision=bf16"))
    after = snapshot(model)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Linear4bit" if bits == 4 else "Linear8bitLt") in kinds
    assert all(moved(before, after, n) for n in after if "lora_B" in n)
    assert not any(moved(before, after, n) for n in after if "lora_" not in n)
    assert result.last_loss is not None and math.isfinite(result.last_loss)


def test_bf16_lora_keeps_adapters_fp32_and_base_bf16(make_cfg, tmp_path):
    model, _, result = train_in_process(make_cfg("train.precision=bf16"))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert dtypes["base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"] == torch.bfloat16
    # the same three steps in fp32 end at the same loss, up to bf16's rounding
    _, _, reference = train_in_process(make_cfg("train.precision=fp32", f"output.dir={tmp_path / 'fp32'}"))
    assert abs(result.last_loss - reference.last_loss) < 0.01 * reference.last_loss, \
        (result.last_loss, reference.last_loss)


def test_continue_from_an_existing_adapter(make_cfg, tmp_path):
    from safetensors.torch import load_file

    from tuneforge.run import train

    first = train(make_cfg(f"output.dir={tmp_path / 'first'}"))
    saved = load_file(str(first / "adapter" / "adapter_model.safetensors"))
    model, before, _ = train_in_process(make_cfg(f"model.adapter_path={first / 'adapter'}"))
    start = {n.replace(".default", ""): v for n, v in before.items() if "lora_B" in n}
    assert start and set(start) == {n for n in saved if "lora_B" in n}
    assert all(torch.equal(start[n], saved[n].float()) for n in start)  # continues from the trained values
    assert all(torch.count_nonzero(v) > 0 for v in start.values())
    after = snapshot(model)
    assert all(moved(before, after, n) for n in before if "lora_B" in n)


def test_stacking_a_new_adapter_merges_the_old_one(make_cfg, tmp_path):
    from tuneforge.run import train

    first = train(make_cfg(f"output.dir={tmp_path / 'first'}"))
    model, before, _ = train_in_process(make_cfg(f"model.adapter_path={first / 'adapter'}",
                                                 "finetune.lora.create_new_adapter=true"))
    lora_b = [v for n, v in before.items() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b)  # a fresh adapter starts at zero


def test_quantized_full_tuning_is_refused(make_cfg):
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot be trained directly"):
        make_cfg("model.quantization_bit=4", "finetune.method=full")


def test_gradient_checkpointing_gives_the_same_update(make_cfg, tmp_path):
    common = ["finetune.method=full", "train.max_steps=1", "train.optimizer=sgd", "train.learning_rate=1e-1"]
    plain, _, _ = train_in_process(make_cfg(*common, f"output.dir={tmp_path / 'a'}"))
    checkpointed, _, _ = train_in_process(make_cfg(*common, "train.gradient_checkpointing=true",
                                                   f"output.dir={tmp_path / 'b'}"))
    a, b = snapshot(plain), snapshot(checkpointed)
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5


def test_llamafactory_flags_train_from_the_command_line(tmp_path, tiny_model_dir):
    from tuneforge.cli.main import main

    out = tmp_path / "lf"
    assert main(["train", "--stage", "sft", "--model_name_or_path", str(tiny_model_dir), "--dataset", "identity",
                 "--template", "chatml", "--finetuning_type", "lora", "--lora_target", "all", "--cutoff_len", "64",
                 "--max_samples", "8", "--per_device_train_batch_size", "2", "--max_steps", "2",
                 "--output_dir", str(out), "--logging_steps", "1", "--do_train", "true"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
