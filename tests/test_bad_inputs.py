"""A corpus of malformed configs and datasets, each run through the real CLI.

Every case must end with a non-zero exit code, one clear message naming the file (and, where it applies, the row,
turn and field) and never a traceback. Data errors go through `data preview` (strict: stderr, exit 2) or
`data check` (the doctor: a report on stdout, exit 1); config-only errors through `config show`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuneforge.cli.main import main

from .conftest import write_json

OK = {"instruction": "Say hi", "input": "", "output": "hi"}


@dataclass
class Ctx:
    """Folders of one case plus helpers to write a config, data files and dataset_info.json."""

    tmp: Path
    data: Path
    model: Path

    def config(self, *, stage: str | None = None, extra: dict[str, Any] | None = None, **data: Any) -> str:
        cfg: dict[str, Any] = {"model": {"path": str(self.model)},
                               "data": {"dataset_dir": str(self.data), "template": "chatml", "dataset": ["a"], **data}}
        if stage:
            cfg["stage"] = stage
        cfg.update(extra or {})
        path = self.tmp / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        return str(path)

    def raw_config(self, text: str | bytes) -> str:
        path = self.tmp / "cfg.yaml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return str(path)

    def info(self, **entries: Any) -> None:
        write_json(self.data / "dataset_info.json", entries)

    def alpaca(self, rows: Any, name: str = "a.json", **entry: Any) -> None:
        """Write rows to `name` and register them as dataset 'a'."""
        write_json(self.data / name, rows)
        self.info(a={"file_name": name, **entry})

    def sharegpt(self, conversations: Any, **entry: Any) -> None:
        """One sharegpt row (the LLaMA-Factory default tags) in s.json, registered as dataset 'a'."""
        write_json(self.data / "s.json", [{"conversations": conversations}])
        self.info(a={"file_name": "s.json", "formatting": "sharegpt", **entry})


COMMANDS = {"preview": ["data", "preview"], "check": ["data", "check"], "show": ["config", "show"],
            "train": ["train"]}
CASES: list[Any] = []


def case(*expect: str, cmd: str = "preview", absent: tuple[str, ...] = (), xfail: str | None = None
         ) -> Callable[[Callable[[Ctx], list[str]]], Callable[[Ctx], list[str]]]:
    """Register a case: the function writes its files and returns the arguments after the command words."""

    def add(fn: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
        marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
        CASES.append(pytest.param(fn, cmd, expect, absent, id=fn.__name__, marks=marks))
        return fn

    return add


def turn(tag: str, text: str = "x") -> dict[str, str]:
    return {"from": tag, "value": text}


# --------------------------------------------------------------------------------------------- data files


@case("a.json: line 3", "invalid JSON", "Expecting ',' delimiter")
def broken_json_in_data_file(c: Ctx) -> list[str]:
    (c.data / "a.json").write_text('[\n {"instruction": "q", "output": "a"},\n {"instruction": "q" "output": "a"}\n]',
                                   encoding="utf-8")
    c.info(a={"file_name": "a.json"})
    return [c.config()]


@case("dataset_info.json: line 3", "invalid JSON", "double quotes")
def broken_json_in_dataset_info(c: Ctx) -> list[str]:
    write_json(c.data / "a.json", [OK])
    (c.data / "dataset_info.json").write_text('{\n "a": {"file_name": "a.json"},\n}\n', encoding="utf-8")
    return [c.config()]


@case("a.jsonl: line 3", "invalid JSON")
def jsonl_line_not_json(c: Ctx) -> list[str]:
    lines = [json.dumps(OK), json.dumps(OK), "instruction: q, output: a"]
    (c.data / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    c.info(a={"file_name": "a.jsonl"})
    return [c.config()]


@case("a.jsonl: line 2", "expected an object with named fields, got list")
def jsonl_line_is_an_array(c: Ctx) -> list[str]:
    (c.data / "a.jsonl").write_text(json.dumps(OK) + "\n" + json.dumps(["q", "a"]) + "\n", encoding="utf-8")
    c.info(a={"file_name": "a.jsonl"})
    return [c.config()]


@case("a.json: row 2", "expected an object with named fields, got list")
def json_row_is_a_list(c: Ctx) -> list[str]:
    c.alpaca([OK, ["Say hi", "", "hi"]])
    return [c.config()]


@case("a.json", "expected a JSON list of row objects, got str")
def json_top_level_is_a_string(c: Ctx) -> list[str]:
    c.alpaca("instruction: say hi")
    return [c.config()]


@case("a.json: line 2", "not UTF-8", "b'\\xe9'")
def data_file_not_utf8(c: Ctx) -> list[str]:
    text = '[\n {"instruction": "caf\u00e9", "input": "", "output": "x"}\n]\n'
    (c.data / "a.json").write_bytes(text.encode("latin-1"))
    c.info(a={"file_name": "a.json"})
    return [c.config()]


@case("dataset 'a'", "file not found", "missing.json", "relative to data.dataset_dir")
def missing_data_file(c: Ctx) -> list[str]:
    c.info(a={"file_name": "missing.json"})
    return [c.config()]


@case("dataset 'a'", "file not found", "missing.json", cmd="check")
def missing_data_file_in_the_doctor(c: Ctx) -> list[str]:
    c.info(a={"file_name": "missing.json"})
    return [c.config()]


# ------------------------------------------------------------------------------------------ alpaca rows


@case("a.json: row 3", "missing field 'instruction'", "the row has input, output", cmd="check")
def missing_instruction_column(c: Ctx) -> list[str]:
    c.alpaca([OK, OK, {"input": "x", "output": "y"}])
    return [c.config()]


@case("a.json: row 2", "field 'output' is empty")
def empty_output(c: Ctx) -> list[str]:
    c.alpaca([OK, {"instruction": "q", "input": "", "output": "  "}])
    return [c.config()]


@case("a.json: row 1", "field 'output' must be one answer (text), got a list", "[1, 2]", cmd="check")
def output_is_a_number_list(c: Ctx) -> list[str]:
    c.alpaca([{"instruction": "q", "output": [1, 2]}, OK])
    return [c.config()]


@case("a.json: row 2", "field 'output' must be text", "{'text': 'a'}")
def output_is_a_dict(c: Ctx) -> list[str]:
    c.alpaca([OK, {"instruction": "q", "output": {"text": "a"}}])
    return [c.config()]


@case("a.json: row 1", "field 'history', item 2", "expected [prompt, response]", "['only one']")
def history_not_pairs(c: Ctx) -> list[str]:
    c.alpaca([{**OK, "history": [["q", "a"], ["only one"]]}], columns={"history": "history"})
    return [c.config()]


@case("a.json: row 1", "field 'history' must be a list of [prompt, response] pairs")
def history_not_a_list(c: Ctx) -> list[str]:
    c.alpaca([{**OK, "history": "q then a"}], columns={"history": "history"})
    return [c.config()]


@case("a.json: row 1", "field 'tools' is not valid JSON", "JSON list of function schemas")
def tools_invalid_json(c: Ctx) -> list[str]:
    c.alpaca([{**OK, "tools": '[{"name": "f",}]'}], columns={"tools": "tools"})
    return [c.config()]


@case("a.json: row 2", "field 'label' (kto_tag) must be true or false", "'maybe'")
def kto_tag_not_boolean(c: Ctx) -> list[str]:
    c.alpaca([{**OK, "label": True}, {**OK, "label": "maybe"}], columns={"kto_tag": "label"})
    return [c.config(stage="kto")]


@case("a.json: row 2", "missing field 'chosen'", "the row has instruction, input, rejected")
def ranking_row_missing_chosen(c: Ctx) -> list[str]:
    pair = {"instruction": "q", "input": "", "chosen": "good", "rejected": "bad"}
    c.alpaca([pair, {"instruction": "q", "input": "", "rejected": "bad"}], ranking=True,
             columns={"chosen": "chosen", "rejected": "rejected"})
    return [c.config(stage="dpo")]


@case("a.json: row 1", "'chosen'")
def ranking_dataset_without_chosen_column(c: Ctx) -> list[str]:
    # ranking: true without columns defaults to chosen/rejected; this row lacks chosen
    c.alpaca([{"instruction": "q", "input": "", "rejected": "bad"}], ranking=True)
    return [c.config(stage="dpo")]


@case("a.json: row 1", "preference stages (rm, dpo) need PreferencePair rows", "dataset 'a' gives Conversation", "ranking")
def plain_rows_for_a_preference_stage(c: Ctx) -> list[str]:
    c.alpaca([OK])
    return [c.config(stage="dpo")]


# ---------------------------------------------------------------------------------------- sharegpt rows


@case("s.json: row 1", "field 'conversations', turn 2", "found role 'human'", "expected 'gpt' or 'function_call'")
def sharegpt_wrong_role_order(c: Ctx) -> list[str]:
    c.sharegpt([turn("human"), turn("human"), turn("gpt")])
    return [c.config()]


@case("s.json: row 1", "turn 2", "found role 'gpt'", "expected 'human' or 'observation'", cmd="check")
def sharegpt_response_right_after_system(c: Ctx) -> list[str]:
    c.sharegpt([turn("system", "be brief"), turn("gpt"), turn("human")])
    return [c.config()]


@case("s.json: row 1", "turn 2", "role 'bot'", "(key 'from') is unknown", "'human', 'gpt'")
def sharegpt_unknown_role_tag(c: Ctx) -> list[str]:
    c.sharegpt([turn("human"), turn("bot")])
    return [c.config()]


@case("s.json: row 1", "field 'conversations' must be a non-empty list", "'hello'", "columns.messages")
def sharegpt_messages_not_a_list(c: Ctx) -> list[str]:
    c.sharegpt("hello")
    return [c.config()]


@case("s.json: row 1", "field 'conversations', turn 1", "expected an object", "'hello'")
def sharegpt_turn_not_an_object(c: Ctx) -> list[str]:
    c.sharegpt(["hello", turn("gpt")])
    return [c.config()]


@case("s.json: row 1", "the last turn must be a response turn", "3 turns ending with 'human'")
def sharegpt_ends_with_user_turn(c: Ctx) -> list[str]:
    c.sharegpt([turn("human"), turn("gpt"), turn("human")])
    return [c.config()]


@case("o.json: row 1", "field 'messages', turn 2", "'content' must be text, got 42")
def openai_content_not_text(c: Ctx) -> list[str]:
    write_json(c.data / "o.json", [{"messages": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": 42}]}])
    c.info(a={"file_name": "o.json", "formatting": "openai"})
    return [c.config()]


# ------------------------------------------------------------------------------------ dataset_info.json


@case("dataset_info.json", "not UTF-8")
def dataset_info_not_utf8(c: Ctx) -> list[str]:
    write_json(c.data / "a.json", [OK])
    (c.data / "dataset_info.json").write_bytes('{"a": {"file_name": "a.json"}, "caf\u00e9": {}}'.encode("latin-1"))
    return [c.config()]


@case("dataset 'my_alpacca' is not registered", "Did you mean 'my_alpaca'?", "dataset_info.json")
def unknown_dataset_name(c: Ctx) -> list[str]:
    write_json(c.data / "a.json", [OK])
    c.info(my_alpaca={"file_name": "a.json"})
    return [c.config(dataset=["my_alpacca"])]


@case("dataset_info.json", "dataset 'a'", "unknown key 'file_nmae'", "Did you mean 'file_name'?")
def dataset_info_unknown_key(c: Ctx) -> list[str]:
    write_json(c.data / "a.json", [OK])
    c.info(a={"file_nmae": "a.json"})
    return [c.config()]


@case("dataset_info.json", "dataset 'a'", "formatting 'chatml' is not one of alpaca, sharegpt, openai")
def dataset_info_unsupported_formatting(c: Ctx) -> list[str]:
    c.alpaca([OK], formatting="chatml")
    return [c.config()]


@case("dataset_info.json", "dataset 'a': columns", "unknown key 'promt'", "Did you mean 'prompt'?")
def dataset_info_columns_unknown_key(c: Ctx) -> list[str]:
    c.alpaca([OK], columns={"promt": "instruction"})
    return [c.config()]


@case("dataset_info.json", "dataset 'a': columns", "'images' columns (multimodal data) are not supported")
def dataset_info_multimodal_columns(c: Ctx) -> list[str]:
    c.alpaca([OK], columns={"images": "images"})
    return [c.config()]


@case("dataset_info.json", "dataset 'a': the entry must be an object, got str")
def dataset_info_entry_not_an_object(c: Ctx) -> list[str]:
    write_json(c.data / "a.json", [OK])
    c.info(a="a.json")
    return [c.config()]


@case("data.val_size=2 leaves no training rows out of 2")
def val_size_leaves_no_training_rows(c: Ctx) -> list[str]:
    c.alpaca([OK, {**OK, "instruction": "Say bye"}])
    return [c.config(val_size=2)]


# ----------------------------------------------------------------------------------------------- configs


@case("cfg.yaml: line 4", "invalid YAML", "expected ',' or ']'", cmd="show")
def yaml_syntax_error(c: Ctx) -> list[str]:
    return [c.raw_config("data:\n  template: chatml\n  dataset: [a, b\noutput:\n  dir: x\n")]


@case("cfg.yaml", "not UTF-8", cmd="show")
def config_not_utf8(c: Ctx) -> list[str]:
    return [c.raw_config("data:\n  default_system: caf\u00e9\n".encode("latin-1"))]


@case("cfg.yaml", "the top level must be a mapping", "got list", cmd="show")
def config_top_level_is_a_list(c: Ctx) -> list[str]:
    return [c.raw_config("- model: x\n- data: y\n")]


@case("cfg.yaml", "unknown key 'trian'", "Did you mean 'train'?", cmd="show")
def unknown_top_level_key(c: Ctx) -> list[str]:
    return [c.raw_config("trian:\n  batch_size: 2\n")]


@case("cfg.yaml", "train.learing_rate: unknown key", "Did you mean 'learning_rate'?", cmd="show")
def unknown_nested_key(c: Ctx) -> list[str]:
    return [c.raw_config("train:\n  learing_rate: 2.0e-4\n")]


@case("cfg.yaml", "train: expected a section (a mapping), got 5", cmd="show")
def section_is_not_a_mapping(c: Ctx) -> list[str]:
    return [c.raw_config("train: 5\n")]


@case("cfg.yaml", "train.batch_size: expected a whole number, got 'abc'", cmd="show")
def wrong_type(c: Ctx) -> list[str]:
    return [c.raw_config("train:\n  batch_size: abc\n")]


@case("cfg.yaml", "finetune.method: 'lorra' is not allowed", "Did you mean 'lora'?", "lora, full, freeze", cmd="show")
def bad_literal_value(c: Ctx) -> list[str]:
    return [c.raw_config("finetune:\n  method: lorra\n")]


@case("cfg.yaml", "model.quantization_bit is set with finetune.method=full", "QLoRA", cmd="show")
def quantization_with_full_finetuning(c: Ctx) -> list[str]:
    return [c.raw_config("model:\n  quantization_bit: 4\nfinetune:\n  method: full\n")]


@case("cfg.yaml", "finetune.lora.dropout must be in [0, 1), got 1.5", cmd="show")
def rule_lora_dropout_out_of_range(c: Ctx) -> list[str]:
    return [c.raw_config("finetune:\n  lora:\n    dropout: 1.5\n")]


@case("cfg.yaml", "'shift_attn: True' (LLaMA-Factory) is not supported", "Remove the key", cmd="show")
def unsupported_llamafactory_key(c: Ctx) -> list[str]:
    return [c.raw_config("model_name_or_path: x\nshift_attn: true\n")]


@case("cfg.yaml", "fsdp: option 'hybrid_shard' is not supported", "full_shard", cmd="show")
def unsupported_fsdp_option(c: Ctx) -> list[str]:
    return [c.raw_config("model_name_or_path: x\nfsdp: hybrid_shard auto_wrap\n")]


@case("cfg.yaml", "FSDP (train.fsdp / fsdp / accelerate's FSDP config) cannot run",
      "model.quantization_bit", cmd="train")
def fsdp_where_it_cannot_run(c: Ctx) -> list[str]:
    return [c.raw_config(f"model_name_or_path: {c.model}\nquantization_bit: 4\nfsdp: full_shard auto_wrap\n"
                         "dataset: identity\ntemplate: chatml\nfinetuning_type: lora\n"
                         f"output_dir: {c.tmp / 'fsdp-run'}\n")]


@case("ds.json", "ds.json is not valid JSON: Expecting property name enclosed in double quotes at line 1",
      cmd="train")
def deepspeed_json_that_does_not_parse(c: Ctx) -> list[str]:
    ds = c.tmp / "ds.json"
    ds.write_text("{'zero_optimization': {}}", encoding="utf-8")
    return [c.raw_config(f"train:\n  deepspeed: {ds}\n  max_steps: 1\n")]


@case("cfg.yaml", "flash_attn: 'bogus' is not one of auto, disabled, sdpa, fa2", cmd="show")
def llamafactory_flag_bad_value(c: Ctx) -> list[str]:
    return [c.raw_config("train:\n  batch_size: 2\n"), "--flash_attn", "bogus"]


@case("config file not found", "nope.yaml", cmd="show")
def missing_config_file(c: Ctx) -> list[str]:
    return [str(c.tmp / "nope.yaml")]


@case("unexpected argument 'train.batch_size'", "key=value", cmd="show")
def override_without_equals(c: Ctx) -> list[str]:
    return [c.raw_config("train:\n  batch_size: 2\n"), "train.batch_size"]


@case("cfg.yaml", "'train.learing_rate': unknown key 'learing_rate'", "Did you mean 'learning_rate'?", cmd="show")
def override_with_unknown_nested_key(c: Ctx) -> list[str]:
    return [c.raw_config("train:\n  batch_size: 2\n"), "train.learing_rate=1e-4"]


@case("cfg.yaml", "model", "is a section", cmd="show", absent=("Did you mean 'model'",))
def override_of_a_whole_section(c: Ctx) -> list[str]:
    return [c.raw_config("train:\n  batch_size: 2\n"), "model=foo"]


# ------------------------------------------------------------------------------------------------ runner


@pytest.mark.parametrize(("setup", "cmd", "expect", "absent"), CASES)
def test_bad_input_gives_one_clear_message(setup, cmd, expect, absent, tmp_path, dataset_dir, tiny_model_dir,
                                           capsys):
    ctx = Ctx(tmp_path, dataset_dir, tiny_model_dir)
    code = main([*COMMANDS[cmd], *setup(ctx)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if cmd == "check":  # the doctor reports bad rows on stdout and exits 1
        assert code == 1, (out, err)
        text = out
        assert "error(s) found" in out
    else:
        assert code == 2, (out, err)
        text = err
        assert err.startswith("error: ") and err.count("\n") == 1, err  # exactly one message line
    missing = [s for s in expect if s not in text]
    assert not missing, f"{missing} not in:\n{text}"
    present = [s for s in absent if s in text]
    assert not present, f"{present} in:\n{text}"


def test_corpus_is_large_and_distinct():
    ids = [p.id for p in CASES]
    assert len(ids) >= 28 and len(set(ids)) == len(ids)


def test_doctor_names_the_row_once(tmp_path, dataset_dir, tiny_model_dir, capsys):
    ctx = Ctx(tmp_path, dataset_dir, tiny_model_dir)
    missing_instruction_column(ctx)
    assert main(["data", "check", ctx.config()]) == 1
    line = next(line for line in capsys.readouterr().out.splitlines() if "missing field" in line)
    assert line.count("a.json: row 3") == 1, line


def test_config_errors_name_the_file_once(tmp_path, dataset_dir, tiny_model_dir, capsys):
    path = yaml_syntax_error(Ctx(tmp_path, dataset_dir, tiny_model_dir))[0]
    assert main(["config", "show", path]) == 2
    err = capsys.readouterr().err
    assert err.count(path) == 1, err
