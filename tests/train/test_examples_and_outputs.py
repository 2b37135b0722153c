"""Every shipped example runs on the tiny model; a run folder follows the contract in DESIGN.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tuneforge.cli.main import main
from tuneforge.config import load

EXAMPLES = sorted(p for p in (Path(__file__).parents[2] / "examples").glob("*.yaml")
                  if p.read_text(encoding="utf-8").startswith("# tuneforge train "))


def test_examples_exist_for_each_stage_and_method():
    names = {p.stem for p in EXAMPLES}
    assert {"quickstart", "pt_full", "sft_full", "sft_freeze", "sft_lora", "sft_qlora", "sft_lora_dora",
            "llamafactory_sft_lora"} <= names


def tiny_reward_adapter(model_dir: Path, folder: Path) -> Path:
    """An rm-style LoRA adapter with a value head on the tiny model, as stage rm saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.models.valuehead import ValueHead, save_value_head

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    save_value_head(folder, ValueHead(base.config.hidden_size))
    return folder


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_starts_with_its_command_and_runs_two_steps(path, tmp_path, tiny_model_dir):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first == f"# tuneforge train examples/{path.name}"
    overrides = [f"model.path={tiny_model_dir}", "train.max_steps=2", "data.max_samples=8", "data.cutoff_len=128",
                 f"output.dir={tmp_path / 'run'}", "output.overwrite=true", f"data.cache_dir={tmp_path / 'c'}"]
    if load(path).data.template == "auto":
        overrides.append("data.template=chatml")
    if load(path).finetune.method == "freeze":
        overrides.append("finetune.freeze.trainable_layers=1")  # the tiny model has 2 layers
    if load(path).stage == "ppo":  # the reward model the example names comes from another example's run
        overrides.append(f"reward_model.path={tiny_reward_adapter(tiny_model_dir, tmp_path / 'rm')}")
    assert main(["train", str(path), *overrides]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2
    method = load(path).finetune.method
    assert (tmp_path / "run" / ("adapter" if method == "lora" else "model")).is_dir()


def test_run_folder_contract(tmp_path, tiny_model_dir):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir)},
        "data": {"dataset": ["identity"], "template": "chatml", "cutoff_len": 128, "max_samples": 24,
                 "val_size": 4},
        "train": {"batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 4, "logging_steps": 1,
                  "save_steps": 2, "eval_steps": 2, "report_to": ["tensorboard"]},
        "output": {"dir": str(tmp_path / "run")}}), encoding="utf-8")
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    # config.yaml reproduces the run: it loads to the same resolved config
    assert load(run / "config.yaml") == load(config)
    manifest = json.loads((run / "manifest.json").read_text())
    for key in ("config", "versions", "git_sha", "data", "template", "seed", "hardware"):
        assert key in manifest
    assert manifest["versions"]["torch"] and manifest["template"]["name"] == "chatml"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed", "eta"):
        assert key in train_lines[0]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and evals[0]["eval_perplexity"] > 1
    assert (run / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    assert (run / "checkpoints" / "step-2" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "plots" / "loss.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    adapter = run / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tuneforge_run.json"):
        assert (adapter / name).is_file(), name
    assert json.loads((adapter / "tuneforge_run.json").read_text())["template"] == "chatml"
    # a finished run is not silently overwritten
    assert main(["train", str(config)]) == 2


@pytest.mark.parametrize(("precision", "weight_bytes", "activation_bytes"), [("fp32", 4, 4), ("bf16", 2, 2)])
def test_plan_prints_steps_memory_and_time_without_training(tmp_path, tiny_model_dir, tokenizer, capsys,
                                                             monkeypatch, precision, weight_bytes, activation_bytes):
    import tuneforge.run

    plans = []
    monkeypatch.setattr(tuneforge.run, "print_plan", lambda plan: (plans.append(plan), print_plan(plan)))
    from tuneforge.train.plan import print_plan

    assert main(["train", "--plan", f"model.path={tiny_model_dir}", "data.dataset=identity", "data.template=chatml",
                 "data.max_samples=32", "data.cutoff_len=16", "train.batch_size=2", f"train.precision={precision}",
                 "train.gradient_accumulation_steps=2", "train.epochs=3", f"output.dir={tmp_path / 'run'}"]) == 0
    err = capsys.readouterr().err
    assert "8 per epoch x 3 epochs = 24" in err and "from two measured steps" in err
    (plan,) = plans
    # every identity row is longer than 16 tokens, so the longest row is exactly cutoff_len
    assert plan.truncated == plan.rows == 32 and plan.precision == precision
    # By hand, from the tiny Llama's shapes (hidden 64, intermediate 128, 2 layers, 4 heads / 2 kv heads of 16,
    # tied embeddings) and LoRA r=8 on all seven linears of a layer:
    vocab = len(tokenizer)
    layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * (64 * 128) + 2 * 64
    base = vocab * 64 + 2 * layer + 64
    lora = 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))
    assert (plan.trainable_params, plan.total_params) == (lora, base + lora)
    tokens = 2 * 16  # batch x longest row
    expected = (base * weight_bytes + lora * 4  # frozen weights in the compute dtype, adapters upcast to fp32
                + lora * 4 * 3  # fp32 gradients and AdamW's two moments of the trained weights
                + tokens * 2 * (10 * 64 + 4 * 128) * activation_bytes  # activations kept for backward
                + 2 * tokens * 4 * 16 * activation_bytes  # attention probabilities (4 heads x 16 keys) a layer
                + tokens * vocab * 4 * 2  # logits and their gradient of the loss chunk
                + 600 * 2**20)  # the Python process with torch imported
    assert plan.peak_memory_gb == pytest.approx(expected / 2**30, rel=1e-12)
    assert f"~{expected / 2**30:.1f} GB per process" in err
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_dataset_file_fails_before_training_with_one_message(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text('{"mine": {"file_name": "nope.json"}}')
    assert main(["train", f"model.path={tiny_model_dir}", "data.dataset=mine", f"data.dataset_dir={tmp_path / 'data'}",
                 f"output.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "file not found" in err and "nope.json" in err and "Traceback" not in err
