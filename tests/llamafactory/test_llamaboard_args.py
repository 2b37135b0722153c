"""A `training_args.yaml` as LLaMA Board 0.9.5 saves it (webui/runner.py `_parse_train_args`, written through
common.py `save_cmd`, which drops None / False / "" values but keeps `packing` and `enable_thinking`) loads and trains.
Written by hand from that field list for an SFT LoRA run with a validation split and LLaMA Board's default
extra arguments (`{"optim": "adamw_torch"}`); only the model path, dataset folder, output folder and sizes differ."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tuneforge.cli.main import main
from tuneforge.config import load

LF_DATA = Path(__file__).parents[1] / "fixtures" / "llamafactory" / "data"

BOARD_ARGS = """\
stage: sft
do_train: true
model_name_or_path: {model}
preprocessing_num_workers: 16
finetuning_type: lora
template: qwen
flash_attn: auto
dataset_dir: {data}
dataset: identity,alpaca_en_demo
cutoff_len: 96
learning_rate: 5.0e-05
num_train_epochs: 3.0
max_samples: 8
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
lr_scheduler_type: cosine
max_grad_norm: 1.0
logging_steps: 1
save_steps: 2
warmup_steps: 0
packing: false
enable_thinking: true
report_to: none
output_dir: {out}
bf16: true
plot_loss: true
trust_remote_code: true
ddp_timeout: 180000000
include_num_input_tokens_seen: true
optim: adamw_torch
lora_rank: 8
lora_alpha: 16
lora_dropout: 0
lora_target: all
val_size: 0.25
eval_strategy: steps
eval_steps: 2
per_device_eval_batch_size: 2
max_steps: 2
"""


def test_llamaboard_training_args_load_with_their_meaning(tmp_path, tiny_model_dir):
    path = tmp_path / "training_args.yaml"
    path.write_text(BOARD_ARGS.format(model=tiny_model_dir, data=LF_DATA, out=tmp_path / "run"))
    cfg = load(path)
    assert cfg.stage == "sft" and cfg.finetune.method == "lora" and cfg.finetune.lora.rank == 8
    assert cfg.finetune.lora.alpha == 16 and cfg.data.dataset == ["identity", "alpaca_en_demo"]
    assert cfg.data.val_size == 0.25 and cfg.train.eval_steps == 2 and cfg.train.eval_batch_size == 2
    assert cfg.train.precision == "bf16" and cfg.train.optimizer == "adamw" and cfg.train.report_to == []
    assert cfg.model.trust_remote_code is True and cfg.data.packing is False


def test_llamaboard_training_args_train(tmp_path, tiny_model_dir):
    path = tmp_path / "training_args.yaml"
    out = tmp_path / "run"
    path.write_text(BOARD_ARGS.format(model=tiny_model_dir, data=LF_DATA, out=out))
    assert yaml.safe_load(path.read_text())["output_dir"] == str(out)
    assert main(["train", str(path)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in records) and records[-1]["step"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
