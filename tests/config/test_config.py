"""Typed config: YAML, overrides, strict keys, the LLaMA-Factory dialect, rules."""

from __future__ import annotations

import re

import pytest

from tuneforge.config import dump, load
from tuneforge.config.schema import RunConfig, TrainConfig
from tuneforge.config.typed import field_docs
from tuneforge.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_our_dialect_with_overrides(tmp_path):
    cfg = load(write(tmp_path, "stage: sft\ntrain:\n  learning_rate: 5e-5\ndata:\n  dataset: [identity]\n"),
               ["train.epochs=2", "finetune.lora.rank=16", "data.dataset=identity,alpaca_en_demo"])
    assert cfg.train.learning_rate == 5e-5 and cfg.train.epochs == 2.0
    assert cfg.finetune.lora.rank == 16
    assert cfg.data.dataset == ["identity", "alpaca_en_demo"]


def test_llamafactory_flat_yaml_maps_onto_sections(tmp_path):
    cfg = load(write(tmp_path, """
model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
stage: sft
do_train: true
finetuning_type: lora
lora_target: q_proj,v_proj
lora_rank: 16
lora_alpha: 32
lora_dropout: 0.05
dataset: identity,alpaca_en_demo
dataset_dir: mydata
template: qwen
cutoff_len: 1024
max_samples: 1000
val_size: 0.1
per_device_train_batch_size: 2
gradient_accumulation_steps: 4
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
logging_steps: 10
save_steps: 500
output_dir: saves/qwen/lora/sft
overwrite_output_dir: true
plot_loss: true
report_to: none
seed: 7
flash_attn: sdpa
"""))
    assert cfg.model.path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cfg.finetune.method == "lora"
    assert cfg.finetune.lora.targets == ["q_proj", "v_proj"]
    assert (cfg.finetune.lora.rank, cfg.finetune.lora.alpha, cfg.finetune.lora.dropout) == (16, 32, 0.05)
    assert cfg.data.dataset == ["identity", "alpaca_en_demo"] and cfg.data.dataset_dir == "mydata"
    assert (cfg.data.template, cfg.data.cutoff_len, cfg.data.max_samples, cfg.data.val_size) == ("qwen", 1024, 1000,
                                                                                                0.1)
    assert (cfg.train.batch_size, cfg.train.gradient_accumulation_steps) == (2, 4)
    assert cfg.train.precision == "bf16" and cfg.train.report_to == [] and cfg.train.seed == 7
    assert cfg.output.dir == "saves/qwen/lora/sft" and cfg.output.overwrite is True
    assert cfg.model.attn_implementation == "sdpa"


def test_llamafactory_flags_without_a_file():
    cfg = load(None, [], {"model_name_or_path": "m", "learning_rate": "3e-4", "quantization_bit": "4"})
    assert cfg.model.path == "m" and cfg.train.learning_rate == 3e-4 and cfg.model.quantization_bit == 4


def test_llamafactory_torch_compile_keys_map_and_refuse_sharded_runs():
    cfg = load(None, [], {"torch_compile": True, "torch_compile_backend": "aot_eager",
                          "torch_compile_mode": "max-autotune"})
    assert (cfg.train.compile, cfg.train.compile_backend, cfg.train.compile_mode) == \
        (True, "aot_eager", "max-autotune")
    with pytest.raises(ConfigError, match="train.compile .* not combined with DeepSpeed or FSDP"):
        load(None, ["train.compile=true", "train.fsdp.enabled=true"])


def test_unsupported_llamafactory_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'shift_attn: True' .* not supported by tuneforge: LongLoRA"):
        load(write(tmp_path, "shift_attn: true\n"))


def test_unknown_key_has_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match="learing_rate.*Did you mean 'learning_rate'"):
        load(write(tmp_path, "train:\n  learing_rate: 1\n"))
    with pytest.raises(ConfigError, match="Did you mean 'learning_rate'"):
        load(write(tmp_path, "learing_rate: 1\n"))


def test_types_are_checked_with_the_key_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train.batch_size: expected a whole number, got 'abc'"):
        load(write(tmp_path, "train:\n  batch_size: abc\n"))
    with pytest.raises(ConfigError, match="Did you mean 'lora'"):
        load(None, ["finetune.method=lorra"])


def test_quantized_full_tuning_is_refused():
    with pytest.raises(ConfigError, match="quantized weights cannot be trained directly"):
        load(None, ["model.quantization_bit=4", "finetune.method=full"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load(None, ["train.learning_rate=2e-4", "data.dataset=identity"])
    again = load(write(tmp_path, dump(cfg)))
    assert again == cfg


def test_every_field_is_documented():
    assert set(field_docs(TrainConfig)) == set(TrainConfig.__dataclass_fields__)
    assert set(field_docs(RunConfig)) == set(RunConfig.__dataclass_fields__)


@pytest.mark.parametrize(("overrides", "message"), [
    (["stage=dpo", "dpo.beta=0"], "dpo.beta (pref_beta) must be > 0"),
    (["stage=dpo", "dpo.loss=hinge", "dpo.label_smoothing=0.1"], "applies to the sigmoid loss only"),
    (["stage=dpo", "dpo.label_smoothing=0.5"], "dpo.label_smoothing must be in [0, 0.5)"),
    (["stage=dpo", "dpo.loss=simpo", "dpo.bco_weight=0.5"], "needs a reference model"),
    (["stage=dpo", "dpo.loss=orpo", "reference.model=x/y"], "dpo.loss=orpo uses no reference model"),
    (["stage=kto", "reference.precompute=true"], "available for stage dpo"),
    (["stage=kto", "kto.rejected_weight=0"], "must be > 0"),
    (["stage=dpo", "reference.adapters=[a]"], "set reference.model"),
    (["stage=dpo", "finetune.lora.pissa_init=true"], "no longer the reference"),
    (["stage=rm", "data.packing=true"], "data.packing is for the sft stage"),
    (["stage=dpo", "pref_loss=sigmod"], "Did you mean 'sigmoid'?"),
])
def test_preference_settings_that_cannot_work_are_one_message(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(None, overrides)


@pytest.mark.parametrize("flags, words", [
    ({"stage": "pt", "neat_packing": True}, "data.neat_packing is for the sft stage; stage pt"),
    ({"stage": "pt", "mask_history": True}, "data.mask_history is for the sft stage"),
    ({"stage": "dpo", "packing": True}, "data.packing is for the sft stage; stage dpo"),
    ({"pissa_init": True, "pissa_convert": True, "use_dora": True}, "pissa_convert rewrites A and B only"),
])
def test_llamafactory_cross_key_rules(flags, words):
    with pytest.raises(ConfigError, match=words):
        load(None, [], flags)


def test_pt_packs_and_eval_strategy_no_means_no_evaluation_during_training():
    from tuneforge.config.rules import eval_interval

    assert load(None, [], {"stage": "pt", "packing": True}).data.packing is True
    assert eval_interval(load(None, [], {"val_size": 0.1, "save_steps": 50}).train) == 50
    assert eval_interval(load(None, [], {"val_size": 0.1, "save_steps": 50, "eval_strategy": "no"}).train) == 0
    assert eval_interval(load(None, [], {"eval_strategy": "steps", "eval_steps": 7}).train) == 7


def test_an_override_cannot_use_the_mapping_suffixes():
    with pytest.raises(ConfigError, match="cannot end with"):
        load(None, ["train.enabled?=false"])
