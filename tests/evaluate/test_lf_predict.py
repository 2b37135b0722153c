"""LLaMA-Factory's predict / eval configs through `tuneforge train`: no training, LF's files in output_dir.

The expected prompt and label strings are what LLaMA-Factory 0.9.5 wrote into generated_predictions.jsonl for
these rows (tiny Llama with SmolLM2's tokenizer, template chatml): `llamafactory-cli train` on the same YAML shape.
The metric key sets are those of its predict_results.json / eval_results.json for that run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from tuneforge.cli.main import main
from tuneforge.config import load
from tuneforge.errors import ConfigError
from tuneforge.run import train

from ..conftest import write_json

ROWS = [{"instruction": "Say hi", "input": "", "output": "Hi there."},
        {"instruction": "Name a color", "input": "", "output": "Blue is a color."},
        {"instruction": "Count", "input": "to three", "output": "one two three"}]
LF_PROMPTS = ["<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n",
              "<|im_start|>user\nName a color<|im_end|>\n<|im_start|>assistant\n",
              "<|im_start|>user\nCount\nto three<|im_end|>\n<|im_start|>assistant\n"]
LF_LABELS = ["Hi there.\n", "Blue is a color.\n", "one two three\n"]  # the answer's end-of-turn text stays
PREDICT_KEYS = {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_runtime",
                "predict_samples_per_second", "predict_steps_per_second", "predict_model_preparation_time"}
EVAL_KEYS = {"eval_loss", "eval_accuracy", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
             "eval_model_preparation_time"}


@pytest.fixture
def tiny_data(dataset_dir: Path) -> Path:
    write_json(dataset_dir / "tiny.json", ROWS)
    write_json(dataset_dir / "dataset_info.json", {"tiny": {"file_name": "tiny.json"}})
    return dataset_dir


def lf_yaml(path: Path, **keys) -> Path:
    """A config in LLaMA-Factory's flat dialect."""
    path.write_text(yaml.safe_dump(keys, sort_keys=False), encoding="utf-8")
    return path


def predict_config(tmp_path: Path, model: Path, adapter: Path, data: Path, **extra) -> Path:
    """The shape of LF's examples/extras/nlg_eval/llama3_lora_predict.yaml on the tiny model."""
    return lf_yaml(tmp_path / "predict.yaml", model_name_or_path=str(model), adapter_name_or_path=str(adapter),
                   trust_remote_code=True, stage="sft", do_predict=True, finetuning_type="lora",
                   eval_dataset="tiny", dataset_dir=str(data), template="chatml", cutoff_len=64, max_samples=50,
                   overwrite_cache=True, preprocessing_num_workers=1, dataloader_num_workers=0,
                   output_dir=str(tmp_path / "predict"), overwrite_output_dir=True, report_to="none",
                   per_device_eval_batch_size=2, predict_with_generate=True, ddp_timeout=180000000,
                   max_new_tokens=4, **extra)


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_lf_predict_config_writes_lf_files_and_trains_nothing(tmp_path, tiny_model_dir, tiny_run, tiny_data):
    adapter = tiny_run / "adapter"
    before = digest(adapter)
    assert main(["train", str(predict_config(tmp_path, tiny_model_dir, adapter, tiny_data))]) == 0
    out = tmp_path / "predict"
    lines = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert [set(line) for line in lines] == [{"prompt", "predict", "label"}] * 3
    assert [line["prompt"] for line in lines] == LF_PROMPTS
    assert [line["label"] for line in lines] == LF_LABELS
    assert [line["label"].strip() for line in lines] == [r["output"] for r in ROWS]
    ours = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [line["predict"] for line in lines] == [r["predict"] for r in ours]  # the same generations
    results = json.loads((out / "predict_results.json").read_text())
    assert set(results) == PREDICT_KEYS
    own = json.loads((out / "eval" / "results.json").read_text())["model"]["predict"]
    assert all(results[f"predict_{k}"] == own[k] for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"))
    # 3 rows in batches of 2 (per_device_eval_batch_size) = 2 steps
    assert results["predict_steps_per_second"] == pytest.approx(2 / results["predict_runtime"], rel=0.01)
    assert json.loads((out / "all_results.json").read_text()) == results
    assert (out / "eval" / "report.md").is_file()
    # nothing was trained: no weights, checkpoints or training logs, and the adapter is untouched
    assert not any((out / name).exists() for name in ("adapter", "model", "checkpoints", "metrics.jsonl"))
    assert digest(adapter) == before


def test_lf_eval_config_writes_eval_results(tmp_path, tiny_model_dir, tiny_run, tiny_data):
    config = lf_yaml(tmp_path / "eval.yaml", model_name_or_path=str(tiny_model_dir),
                     adapter_name_or_path=str(tiny_run / "adapter"), stage="sft", do_eval=True,
                     finetuning_type="lora", eval_dataset="tiny", dataset_dir=str(tiny_data), template="chatml",
                     cutoff_len=64, output_dir=str(tmp_path / "eval_out"), per_device_eval_batch_size=2,
                     compute_accuracy=True)
    assert main(["train", str(config)]) == 0
    out = tmp_path / "eval_out"
    results = json.loads((out / "eval_results.json").read_text())
    assert EVAL_KEYS <= set(results)
    own = json.loads((out / "eval" / "results.json").read_text())["model"]["loss"]
    assert results["eval_loss"] == own["loss"] and results["eval_accuracy"] == own["token_accuracy"]
    assert not (out / "adapter").exists() and not (out / "generated_predictions.jsonl").exists()


def test_train_then_eval_and_predict_on_the_validation_split(tmp_path, tiny_model_dir, tiny_data):
    config = lf_yaml(tmp_path / "train.yaml", model_name_or_path=str(tiny_model_dir), stage="sft", do_train=True,
                     do_eval=True, do_predict=True, predict_with_generate=True, finetuning_type="lora",
                     lora_rank=4, dataset="tiny", dataset_dir=str(tiny_data), val_size=2, template="chatml",
                     cutoff_len=64, output_dir=str(tmp_path / "run"), max_steps=2, save_steps=0,
                     learning_rate=1e-3, max_new_tokens=3, bf16=False)
    assert main(["train", str(config), "train.precision=fp32"]) == 0
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    lines = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    labels = {r["output"] + "\n" for r in ROWS}
    assert len(lines) == 2 and all(line["label"] in labels for line in lines)
    combined = json.loads((out / "all_results.json").read_text())
    assert {"eval_loss", "predict_bleu-4"} <= set(combined)
    # the model was trained by this run, so there is no separate model preparation (as the HF Trainer)
    assert not any(k.endswith("model_preparation_time") for k in combined)
    assert json.loads((out / "eval" / "results.json").read_text())["model"]["loss"]["rows"] == 2


def test_do_train_decides_whether_anything_is_trained():
    assert load(None, [], {"do_predict": True}).train.enabled is False
    assert load(None, [], {"do_predict": True, "do_train": True}).train.enabled is True
    assert load(None, [], {"do_train": True, "do_predict": True}).train.enabled is True
    both = load(None, [], {"do_eval": True, "do_predict": True, "predict_with_generate": True})
    assert both.eval.modes == ["loss", "predict"] and both.eval.after_training
    assert load(None, [], {"output_dir": "saves/x"}).eval.lf_dir == "saves/x"
    with pytest.raises(ConfigError, match="no evaluation is asked for"):
        train(load(None, [], {"do_train": False}))
