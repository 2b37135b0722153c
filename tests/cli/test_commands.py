"""The CLI commands of the foundation, run in-process through main()."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tuneforge import __version__
from tuneforge.cli.main import main
from tuneforge.data.encode import IGNORE_INDEX

from ..conftest import write_json


def make_config(tmp_path, tiny_model_dir, dataset_dir, **data):
    cfg = {"model": {"path": str(tiny_model_dir)},
           "data": {"dataset_dir": str(dataset_dir), "template": "chatml", **data}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(path)


def test_version_and_module_entry(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == __version__
    done = subprocess.run([sys.executable, "-m", "tuneforge", "--help"], capture_output=True, text=True, check=True)
    assert "data" in done.stdout and "templates" in done.stdout


def test_env_reports_versions_and_bf16(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "transformers" in out and "cpu bf16" in out


def test_templates_list_and_show(capsys):
    assert main(["templates", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("auto", "qwen", "qwen3", "llama3", "chatglm3", "glm4", "baichuan2", "phi", "vicuna"):
        assert name in out
    assert main(["templates", "show", "qwen"]) == 0
    out = capsys.readouterr().out
    assert "«I am an AI assistant.<|im_end|>\n»" in out and "stop words: <|im_end|>" in out


def test_preview_jsonl_gives_ids_and_masked_labels(tmp_path, tiny_model_dir, dataset_dir, tokenizer, capsys):
    write_json(dataset_dir / "a.json", [{"instruction": "Say hi", "input": "", "output": "hi"}] * 2)
    write_json(dataset_dir / "dataset_info.json", {"a": {"file_name": "a.json"}})
    config = make_config(tmp_path, tiny_model_dir, dataset_dir, dataset=["a"])
    assert main(["data", "preview", config, "--format", "jsonl", "--num", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    trained = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "hi<|im_end|>\n"
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>user\nSay hi<|im_end|>")


def test_preview_text_marks_trained_tokens(tmp_path, tiny_model_dir, dataset_dir, capsys):
    write_json(dataset_dir / "a.json", [{"instruction": "Say hi", "input": "", "output": "hi"}])
    write_json(dataset_dir / "dataset_info.json", {"a": {"file_name": "a.json"}})
    assert main(["data", "preview", make_config(tmp_path, tiny_model_dir, dataset_dir, dataset=["a"])]) == 0
    out = capsys.readouterr().out
    assert "«hi<|im_end|>\n»" in out and "a.json: row 1" in out


def test_check_lists_bad_rows_and_exits_nonzero(tmp_path, tiny_model_dir, dataset_dir, capsys):
    write_json(dataset_dir / "bad.json", [
        {"instruction": "ok", "input": "", "output": "fine"},
        {"instruction": "empty", "input": "", "output": "  "},
        {"input": "no instruction", "output": "x"},
        {"instruction": "ok", "input": "", "output": "fine"},
    ])
    write_json(dataset_dir / "dataset_info.json", {"bad": {"file_name": "bad.json"}})
    assert main(["data", "check", make_config(tmp_path, tiny_model_dir, dataset_dir, dataset=["bad"])]) == 1
    out = capsys.readouterr().out
    assert "bad.json: row 2: field 'output' is empty" in out
    assert "bad.json: row 3: missing field 'instruction'" in out
    assert "row 4: exact duplicate of" in out and "2 error(s) found" in out


def test_check_reports_train_validation_overlap(tmp_path, tiny_model_dir, dataset_dir, capsys):
    write_json(dataset_dir / "a.json", [{"instruction": f"q{i}", "input": "", "output": "same"} for i in range(4)])
    write_json(dataset_dir / "b.json", [{"instruction": "q1", "input": "", "output": "same"}])
    write_json(dataset_dir / "dataset_info.json", {"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}})
    config = make_config(tmp_path, tiny_model_dir, dataset_dir, dataset=["a"], eval_dataset=["b"])
    assert main(["data", "check", config]) == 0
    assert "b.json: row 1: row of eval dataset 'b' also in training data" in capsys.readouterr().out


def test_check_reports_zero_trained_tokens_and_truncation(tmp_path, tiny_model_dir, dataset_dir, capsys):
    write_json(dataset_dir / "a.json", [{"instruction": "word " * 200, "input": "", "output": "short"}])
    write_json(dataset_dir / "dataset_info.json", {"a": {"file_name": "a.json"}})
    config = make_config(tmp_path, tiny_model_dir, dataset_dir, dataset=["a"], cutoff_len=16)
    assert main(["data", "check", config]) == 0
    assert "a.json: row 1: longer than cutoff_len=16; truncated" in capsys.readouterr().out


def test_identity_command_writes_substituted_rows(tmp_path, capsys):
    out = tmp_path / "identity.json"
    assert main(["data", "identity", "--name", "Zed", "--author", "Acme", "-o", str(out)]) == 0
    rows = json.loads(out.read_text(encoding="utf-8"))
    text = json.dumps(rows, ensure_ascii=False)
    assert len(rows) >= 40 and "{{" not in text and "Zed" in text and "Acme" in text


def test_config_show_prints_our_dialect_for_lf_flags(capsys):
    assert main(["config", "show", "--model_name_or_path", "m", "--lora_rank", "4", "train.epochs=1"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["path"] == "m" and shown["finetune"]["lora"]["rank"] == 4
    assert shown["train"]["epochs"] == 1.0


def test_user_errors_print_one_line_and_no_traceback(capsys):
    assert main(["config", "show", "--no_such_key", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no_such_key" in err and "Traceback" not in err



@pytest.mark.parametrize(("stage", "datasets"), [
    ("sft", "identity,alpaca_en_demo,alpaca_zh_demo,sharegpt_demo,glaive_toolcall_en_demo"),
    ("dpo", "dpo_en_demo,dpo_zh_demo"), ("kto", "kto_en_demo"), ("pt", "c4_demo")])
def test_bundled_datasets_are_reported_clean(tiny_model_dir, stage, datasets, capsys):
    assert main(["data", "check", f"model.path={tiny_model_dir}", f"stage={stage}", f"data.dataset={datasets}",
                 "data.template=qwen", "data.cutoff_len=4096"]) == 0
    assert "clean: no errors" in capsys.readouterr().out


def test_preview_of_a_dpo_pair_marks_chosen_and_rejected(tmp_path, tiny_model_dir, dataset_dir, capsys):
    write_json(dataset_dir / "p.json", [{"instruction": "Capital of France?", "chosen": "Paris", "rejected": "Rome"}])
    write_json(dataset_dir / "dataset_info.json", {"p": {"file_name": "p.json", "ranking": True, "columns": {
        "prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}})
    assert main(["data", "preview", make_config(tmp_path, tiny_model_dir, dataset_dir, dataset=["p"]),
                 "stage=dpo"]) == 0
    out = capsys.readouterr().out
    assert "[chosen:" in out and "[rejected:" in out
    assert "«Paris<|im_end|>\n»" in out and "«Rome<|im_end|>\n»" in out
    assert "«Capital" not in out  # the prompt is never trained


def test_check_names_bad_pairs_and_kto_tags(tmp_path, tiny_model_dir, dataset_dir, capsys):
    write_json(dataset_dir / "p.json", [
        {"instruction": "ok", "chosen": "good", "rejected": "bad"},
        {"instruction": "same", "chosen": "twin", "rejected": "twin"},
        {"instruction": "missing side", "chosen": "only chosen"},
        {"instruction": "list side", "chosen": ["a", "b"], "rejected": "bad"},
    ])
    write_json(dataset_dir / "k.json", [
        {"instruction": "q", "output": "a", "label": True},
        {"instruction": "q", "output": "a", "label": "maybe"},
    ])
    write_json(dataset_dir / "dataset_info.json", {
        "p": {"file_name": "p.json", "ranking": True,
              "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}},
        "k": {"file_name": "k.json", "columns": {"prompt": "instruction", "response": "output", "kto_tag": "label"}}})
    assert main(["data", "check", make_config(tmp_path, tiny_model_dir, dataset_dir, dataset=["p"]), "stage=dpo"]) == 1
    out = capsys.readouterr().out
    assert "p.json: row 2: chosen and rejected answers are identical" in out
    assert "p.json: row 3: missing field 'rejected'" in out
    assert "p.json: row 4: field 'chosen'" in out
    assert "p.json: row 1" not in out
    assert main(["data", "check", make_config(tmp_path, tiny_model_dir, dataset_dir, dataset=["k"]), "stage=kto"]) == 1
    assert "k.json: row 2: field 'label' (kto_tag) must be true or false, got 'maybe'" in capsys.readouterr().out
