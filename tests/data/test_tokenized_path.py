"""data.tokenized_path (LLaMA-Factory's tokenized_path): saved when missing, loaded instead of the data when present."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tuneforge.cli.main import main
from tuneforge.config import load
from tuneforge.data.build import build_datasets
from tuneforge.data.tokenized import RECORD
from tuneforge.errors import ConfigError, DataError
from tuneforge.models.load import load_tokenizer
from tuneforge.templates import get_template

from ..conftest import write_json


def write_data(dataset_dir, n: int = 12) -> None:
    write_json(dataset_dir / "qa.json", [{"instruction": f"question {i}", "input": "", "output": f"answer {i}"}
                                         for i in range(n)])
    write_json(dataset_dir / "dataset_info.json", {"qa": {"file_name": "qa.json"}})


def config(tiny_model_dir, dataset_dir, tokenized, *extra):
    return load(None, [f"model.path={tiny_model_dir}", f"data.dataset_dir={dataset_dir}", "data.dataset=qa",
                       "data.template=chatml", "data.cutoff_len=64", "data.val_size=2",
                       f"data.tokenized_path={tokenized}", "train.max_steps=1", "train.precision=fp32", *extra])


def test_first_run_saves_the_rows_and_a_second_run_trains_on_them_without_the_data(
        tmp_path, tiny_model_dir, dataset_dir, monkeypatch):
    from tuneforge.run import prepare

    write_data(dataset_dir)
    tokenized = tmp_path / "tokenized" / "sft"
    cfg = config(tiny_model_dir, dataset_dir, tokenized, f"output.dir={tmp_path / 'run'}")
    first = prepare(cfg, plan_only=True)
    assert (tokenized / "dataset_dict.json").is_file() and (tokenized / RECORD).is_file()
    assert len(first.train_rows) == 10 and len(first.val_rows) == 2

    shutil.rmtree(dataset_dir)  # neither the data files ...
    shutil.rmtree(tmp_path / "cache")  # ... nor the tokenized-data cache are there any more
    second = prepare(cfg, plan_only=True)
    assert second.train_rows == first.train_rows and second.val_rows == first.val_rows
    assert second.data.from_cache and second.data.key == first.data.key
    assert second.data.report == first.data.report


def test_the_saved_folder_is_what_llamafactory_saves(tmp_path, tiny_model_dir, dataset_dir):
    from datasets import load_from_disk

    write_data(dataset_dir)
    cfg = config(tiny_model_dir, dataset_dir, tmp_path / "tok")
    template = get_template("chatml", load_tokenizer(cfg.model))
    build_datasets(cfg.data, "sft", template, seed=42)
    saved = load_from_disk(str(tmp_path / "tok"))
    assert sorted(saved) == ["train", "validation"]
    assert {"input_ids", "labels"} <= set(saved["train"].column_names)
    record = json.loads((tmp_path / "tok" / RECORD).read_text())
    assert record["kind"] == "sft" and record["template_name"] == "chatml" and record["cutoff_len"] == 64


@pytest.fixture
def saved_sft(tmp_path, tiny_model_dir, dataset_dir):
    write_data(dataset_dir)
    cfg = config(tiny_model_dir, dataset_dir, tmp_path / "tok")
    tokenizer = load_tokenizer(cfg.model)
    build_datasets(cfg.data, "sft", get_template("chatml", tokenizer), seed=42)
    return cfg, tokenizer


def test_rows_made_for_another_stage_are_refused(saved_sft):
    cfg, tokenizer = saved_sft
    with pytest.raises(DataError, match=r"tokenized for stage sft, but this run is stages rm and dpo"):
        build_datasets(cfg.data, "pairwise", get_template("chatml", tokenizer), seed=42)


def test_rows_of_another_template_or_tokenizer_are_refused(saved_sft):
    cfg, tokenizer = saved_sft
    with pytest.raises(DataError, match=r"rendered with template 'chatml', this run uses 'alpaca'"):
        build_datasets(cfg.data, "sft", get_template("alpaca", tokenizer), seed=42)
    tokenizer.add_tokens(["<new>"])
    with pytest.raises(DataError, match="another tokenizer"):
        build_datasets(cfg.data, "sft", get_template("chatml", tokenizer), seed=42)


def test_a_folder_saved_by_llamafactory_loads_by_its_columns(tmp_path, tokenizer, caplog):
    from datasets import Dataset, DatasetDict

    rows = {"input_ids": [[1, 2, 3], [4, 5]], "attention_mask": [[1, 1, 1], [1, 1]],
            "labels": [[-100, 2, 3], [-100, 5]], "kto_tags": [True, False]}
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "lf"))
    data = load(None, [f"data.tokenized_path={tmp_path / 'lf'}"]).data
    encoded = build_datasets(data, "kto", get_template("chatml", tokenizer), seed=1)
    assert encoded.train["kto_label"] == [True, False] and encoded.val is None
    assert encoded.report.trained_tokens == 3 and "no tuneforge record" in caplog.text
    with pytest.raises(DataError, match="lacks the columns chosen_input_ids"):
        build_datasets(data, "pairwise", get_template("chatml", tokenizer), seed=1)


def test_tokenize_command_saves_and_then_checks(tmp_path, tiny_model_dir, dataset_dir, capsys):
    write_data(dataset_dir)
    path = tmp_path / "cfg.yaml"  # LLaMA-Factory's flat keys, as in its qwen3_preprocess.yaml example
    path.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model_dir), "stage": "sft", "dataset": "qa",
                                    "dataset_dir": str(dataset_dir), "template": "chatml", "cutoff_len": 64,
                                    "tokenized_path": str(tmp_path / "tok")}), encoding="utf-8")
    assert main(["data", "tokenize", str(path)]) == 0
    assert "now holds 12 training rows" in capsys.readouterr().out
    assert main(["data", "tokenize", str(path)]) == 0
    assert "already holds" in capsys.readouterr().out


def test_streaming_is_refused_with_what_to_use_instead():
    assert load(None, ["streaming=false", "buffer_size=100"]).data.tokenized_path is None
    with pytest.raises(ConfigError, match="streaming.*use tokenized_path"):
        load(None, ["streaming=true"])


def test_an_eval_only_config_with_just_a_tokenized_path_measures_its_validation_rows(
        tmp_path, tiny_model_dir, dataset_dir):
    write_data(dataset_dir)
    tokenized = tmp_path / "tok"
    prepare_cfg = tmp_path / "tokenize.yaml"
    prepare_cfg.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model_dir), "dataset_dir": str(dataset_dir), "dataset": "qa",
        "template": "chatml", "cutoff_len": 64, "val_size": 3, "tokenized_path": str(tokenized)}))
    assert main(["data", "tokenize", str(prepare_cfg)]) == 0
    shutil.rmtree(dataset_dir)  # LF users evaluate a tokenized_path without the data files
    eval_cfg = tmp_path / "eval.yaml"
    out = tmp_path / "out"
    eval_cfg.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model_dir), "template": "chatml", "cutoff_len": 64,
        "tokenized_path": str(tokenized), "do_eval": True, "output_dir": str(out)}))
    assert main(["train", str(eval_cfg)]) == 0
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["model"]["loss"]["rows"] == 3  # the saved validation split, not the 9 training rows
