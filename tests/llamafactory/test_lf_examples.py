"""LLaMA-Factory 0.9.5's own text-model example configs (tests/fixtures/llamafactory/examples, unchanged; see
scripts/vendor_lf_examples.py) run with only the model path, output paths and sizes changed, as its users run them:
training ones through `tuneforge train`, merge ones through `tuneforge export`, inference ones through
`tuneforge chat`. Those that need a feature of a later issue fail with one clear refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tuneforge.cli.main import main

LF = Path(__file__).parents[1] / "fixtures" / "llamafactory"
EXAMPLES = LF / "examples"
SIZES = ["max_samples=8", "cutoff_len=96", "max_steps=2", "preprocessing_num_workers=1", "dataloader_num_workers=0"]
# Examples that need Ray: refused, naming the key. The ASFT examples name datasets (med, math) that LF's data
# folder does not register: the error names the dataset, as LF's would.
REFUSED = {"train_lora/qwen3_lora_sft_ray.yaml": "ray_num_workers",
           "extras/asft/llama2_full_asft.yaml": "dataset 'med' is not registered",
           "extras/asft/qwen2_full_asft.yaml": "dataset 'math' is not registered"}
# DeepSpeed examples run under torchrun with 2 processes in tests/train/test_distributed.py (and the
# accelerate/ FSDP configs there under `accelerate launch`); the ASFT ones (whose
# point is the loss) run here in one process without their `deepspeed` key.
UNDER_TORCHRUN = {"train_lora/qwen3_lora_sft_ds3.yaml", "train_full/qwen3_full_sft.yaml"}
TRAINING = sorted(
    str(p.relative_to(EXAMPLES)) for p in EXAMPLES.glob("*/**/*.yaml")
    if p.parts[-2] not in {"merge_lora", "inference", "accelerate"} and "predict" not in p.name and "preprocess" not in p.name
    and str(p.relative_to(EXAMPLES)) not in UNDER_TORCHRUN
)
# Sizes that must shrink with the tiny model (hidden 64, 2 layers).
EXTRA_SIZES = {"galore_rank": 4, "apollo_rank": 4, "oft_block_size": 8}


def read(example: str) -> dict:
    return yaml.safe_load((EXAMPLES / example).read_text(encoding="utf-8"))


def sized(example: str) -> list[str]:
    """Sizes scaled down for the tiny model; accumulation only ever shrinks (layerwise GaLore needs 1)."""
    raw = read(example)
    accumulation = min(int(raw.get("gradient_accumulation_steps", 1)), 2)
    return [f"gradient_accumulation_steps={accumulation}"] + [f"{k}={v}" for k, v in EXTRA_SIZES.items() if k in raw]


def test_the_examples_are_lfs_text_model_examples():
    assert len(TRAINING) >= 17
    assert set(REFUSED) <= set(TRAINING)


@pytest.mark.parametrize("example", TRAINING)
def test_training_example_runs(example, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    model = tiny_model_dir
    raw = read(example)
    if raw.get("use_llama_pro"):
        model = tmp_path / "pro"
        assert main(["expand", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(model),
                     "--num_expand", "2"]) == 0
        raw_sizes = ["freeze_trainable_layers=2"]
    else:
        raw_sizes = []
    paths = [f"model_name_or_path={model}", f"output_dir={out}", f"dataset_dir={LF / 'data'}"]
    if "deepspeed" in raw:
        paths.append("deepspeed=")
    code = main(["train", str(EXAMPLES / example), *paths, *SIZES, *sized(example), *raw_sizes])
    err = capsys.readouterr().err
    if example in REFUSED:
        assert code == 2 and REFUSED[example] in err and "Traceback" not in err
        return
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2
    weights = "adapter/adapter_model.safetensors" if raw.get("finetuning_type", "lora") in {"lora", "oft"} \
        else "model/model.safetensors"
    assert (out / weights).is_file() or list(out.glob("model/*.safetensors")), sorted(p.name for p in out.iterdir())


def test_preprocess_example_saves_the_tokenized_dataset(tmp_path, tiny_model_dir):
    tokenized = tmp_path / "tokenized"
    assert main(["train", str(EXAMPLES / "train_lora/qwen3_preprocess.yaml"), f"model_name_or_path={tiny_model_dir}",
                 f"output_dir={tmp_path / 'run'}", f"dataset_dir={LF / 'data'}", f"tokenized_path={tokenized}",
                 *SIZES]) == 0
    assert tokenized.is_dir() and any(tokenized.iterdir())


@pytest.fixture(scope="module")
def lf_sft_run(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("lf") / "sft"
    assert main(["train", str(EXAMPLES / "train_lora/qwen3_lora_sft.yaml"), f"model_name_or_path={tiny_model_dir}",
                 f"output_dir={out}", f"dataset_dir={LF / 'data'}", *SIZES, "gradient_accumulation_steps=2"]) == 0
    return out


def test_predict_example_writes_llamafactorys_files(lf_sft_run, tmp_path, tiny_model_dir):
    out = tmp_path / "predict"
    assert main(["train", str(EXAMPLES / "extras/nlg_eval/llama3_lora_predict.yaml"),
                 f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={lf_sft_run / 'adapter'}",
                 f"output_dir={out}", f"dataset_dir={LF / 'data'}", "max_samples=2", "max_new_tokens=4"]) == 0
    lines = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and set(lines[0]) >= {"prompt", "predict", "label"}  # 2 rows of each of 2 datasets
    assert "predict_bleu-4" in json.loads((out / "predict_results.json").read_text())
    assert not (out / "adapter").exists()


@pytest.mark.parametrize("example", ["merge_lora/qwen3_lora_sft.yaml", "merge_lora/qwen3_full_sft.yaml"])
def test_merge_example_exports(example, lf_sft_run, tmp_path, tiny_model_dir):
    export = tmp_path / "merged"
    paths = [f"model_name_or_path={tiny_model_dir}", f"export_dir={export}"]
    if "adapter_name_or_path" in read(example):
        paths.append(f"adapter_name_or_path={lf_sft_run / 'adapter'}")
    assert main(["export", str(EXAMPLES / example), *paths]) == 0
    assert list(export.glob("*.safetensors"))


@pytest.mark.parametrize("example", ["inference/qwen3.yaml", "inference/qwen3_lora_sft.yaml",
                                     "inference/qwen3_full_sft.yaml"])
def test_inference_example_chats(example, lf_sft_run, tiny_model_dir, monkeypatch, capsys):
    import io
    paths = [f"model_name_or_path={tiny_model_dir}", "max_new_tokens=3"]
    if "adapter_name_or_path" in read(example):
        paths.append(f"adapter_name_or_path={lf_sft_run / 'adapter'}")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(["chat", str(EXAMPLES / example), *paths]) == 0  # the tiny random model's answer may be blank
    assert "error" not in capsys.readouterr().err
