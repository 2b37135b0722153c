"""The bad-input corpus, part two (part one, tests/test_bad_inputs.py, holds data files, registries and config
files): values out of range in both config dialects, paths that must exist or be creatable, command-line flags, a
few more data rows, API requests and web UI fields. Each case: one clear message naming the key, path, row or
field, a non-zero exit (or a 4xx), and never a traceback.

Commands run in-process through the CLI's own entry point (`tuneforge.cli.main.main`): a user error prints one
line `error: ...` and returns 2; anything else would raise here and fail the case with its traceback.
"""

from __future__ import annotations

import json

import pytest

from tuneforge.cli.main import main

from .conftest import write_json


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and everything printed."""
    code = main(argv)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text
    return code, text


def expect(argv: list[str], capsys, *fragments: str, code: int = 2) -> None:
    got, text = run(argv, capsys)
    assert got == code, f"exit {got} (expected {code}): {text[-2000:]}"
    message = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(message) == 1, text[-2000:]  # one message
    for fragment in fragments:
        assert fragment.lower() in text.lower(), f"{fragment!r} not in: {text[-2000:]}"


# ---------------------------------------------------------------------------------------------------------------
# Configs in tuneforge's dialect (dotted overrides), checked by `tuneforge config show`
OURS = [
    (["train.learning_rate=abc"], ["train.learning_rate"]),
    (["train.batch_size=0"], ["train.batch_size", ">= 1"]),
    (["train.batch_size=1.5"], ["train.batch_size"]),
    (["train.epochs=-1"], ["train.epochs"]),
    (["train.warmup_ratio=1.5"], ["train.warmup_ratio"]),
    (["train.logging_steps=0"], ["train.logging_steps"]),
    (["train.save_steps=-1"], ["train.save_steps"]),
    (["train.adam_beta1=1.2"], ["train.adam_beta1"]),
    (["train.adam_epsilon=0"], ["train.adam_epsilon"]),
    (["train.max_grad_norm=-1"], ["train.max_grad_norm"]),
    (["train.weight_decay=-0.1"], ["train.weight_decay"]),
    (["train.optimizer=adamww"], ["train.optimizer", "adamw"]),
    (["train.precision=fp8"], ["train.precision", "fp8"]),
    (["train.batchsize=2"], ["train.batchsize", "unknown key", "batch_size"]),
    (["trian.batch_size=2"], ["trian", "train"]),
    (["stage=sftt"], ["stage", "sft"]),
    (["finetune.method=lorra"], ["finetune.method", "lora"]),
    (["finetune.lora.rank=0"], ["finetune.lora.rank"]),
    (["finetune.lora.dropout=1.5"], ["finetune.lora.dropout"]),
    (["data.cutoff_len=4"], ["data.cutoff_len"]),
    (["data.val_size=-0.1"], ["data.val_size"]),
    (["data.val_size=0.1", "data.eval_dataset=[x]"], ["data.val_size", "data.eval_dataset"]),
    (["data.max_samples=0"], ["data.max_samples"]),
    (["data.num_proc=0"], ["data.num_proc"]),
    (["data.dataset=[a,b]", "data.mix_strategy=interleave_under", "data.interleave_probs=[1.0]"],
     ["data.interleave_probs"]),
    (["generation.top_p=0"], ["generation.top_p"]),
    (["generation.temperature=-1"], ["generation.temperature"]),
    (["generation.max_new_tokens=0"], ["generation.max_new_tokens"]),
    (["generation.repetition_penalty=0"], ["generation.repetition_penalty"]),
    (["export.size=0"], ["export.size"]),
    (["eval.batch_size=0"], ["eval.batch_size"]),
    (["model.quantization_bit=3"], ["model.quantization_bit"]),
    (["stage=dpo", "dpo.beta=0"], ["dpo.beta"]),
    (["stage=grpo", "grpo.num_generations=1", "grpo.reward_funcs=[accuracy]"], ["grpo.num_generations"]),
    (["stage=kto", "kto.beta=-1"], ["kto.beta"]),
    (["train.compile=true", "train.fsdp.enabled=true"], ["train.compile"]),
    (["stage=pt", "data.neat_packing=true"], ["data.neat_packing"]),
    (["train.max_grad_norm=x"], ["train.max_grad_norm"]),
    (["train.report_to=[wandb]"], ["train.report_to", "wandb", "not installed"]),
    (["train.report_to=[tensorbored]"], ["train.report_to", "tensorbored"]),
    (["loose"], ["config file not found: loose"]),
]


@pytest.mark.parametrize(("overrides", "fragments"), OURS, ids=[" ".join(o) for o, _ in OURS])
def test_our_dialect(overrides, fragments, capsys):
    expect(["config", "show", *overrides], capsys, *fragments)


# ---------------------------------------------------------------------------------------------------------------
# LLaMA-Factory's flat keys, as flags
LF = [
    (["--learning_rate", "abc"], ["learning_rate"]),
    (["--stage", "sftt"], ["stage", "sft"]),
    (["--finetuning_type", "lorra"], ["finetuning_type", "lora"]),
    (["--lora_rank", "0"], ["lora.rank"]),
    (["--per_device_train_batch_size", "0"], ["batch_size"]),
    (["--num_train_epochs", "-1"], ["epochs"]),
    (["--cutoff_len", "2"], ["cutoff_len"]),
    (["--val_size", "0.1", "--eval_dataset", "x"], ["val_size", "eval_dataset"]),
    (["--logging_steps", "0"], ["logging_steps"]),
    (["--shift_attn", "true"], ["shift_attn", "not supported"]),
    (["--push_to_hub", "true"], ["push_to_hub"]),
    (["--lr_scheduler_type", "cosin"], ["cosine"]),
    (["--stage", "dpo", "--pref_loss", "sigmod"], ["sigmoid"]),
    (["--quantization_bit", "3"], ["quantization_bit"]),
    (["--lora_rnak", "8"], ["lora_rnak", "lora_rank"]),
    (["--stage", "pt", "--neat_packing", "true"], ["neat_packing"]),
    (["--max_grad_norm", "-1"], ["max_grad_norm"]),
    (["--warmup_ratio", "2"], ["warmup_ratio"]),
    (["--stage", "grpo", "--num_generations", "1", "--reward_funcs", "accuracy"], ["num_generations"]),
    (["--top_p", "0"], ["top_p"]),
    (["--temperature", "-1"], ["temperature"]),
    (["--max_new_tokens", "0"], ["max_new_tokens"]),
    (["--adam_beta2", "1"], ["adam_beta2"]),
    (["--save_total_limit", "0"], ["save_total_limit"]),
    (["--pissa_init", "true", "--pissa_convert", "true", "--use_dora", "true"], ["pissa_convert"]),
    (["--report_to", "mlflow"], ["report_to", "mlflow", "pip install mlflow"]),
]


@pytest.mark.parametrize(("flags", "fragments"), LF, ids=[" ".join(f) for f, _ in LF])
def test_llamafactory_flags(flags, fragments, capsys):
    expect(["config", "show", *flags], capsys, *fragments)


# ---------------------------------------------------------------------------------------------------------------
# YAML files
YAMLS = [
    ("sections.yaml", "trainer:\n  batch_size: 2\n", ["sections.yaml", "trainer"]),
    ("flat.yaml", "model_name_or_path: m\nlearning_rat: 1.0e-4\n", ["flat.yaml", "learning_rat", "learning_rate"]),
    ("range.yaml", "stage: sft\nper_device_train_batch_size: -2\n", ["range.yaml", "batch_size"]),
    ("scalar.yaml", "just a sentence\n", ["scalar.yaml"]),
]


@pytest.mark.parametrize(("name", "text", "fragments"), YAMLS, ids=[y[0] for y in YAMLS])
def test_yaml_files(name, text, fragments, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    expect(["config", "show", str(path)], capsys, *fragments)


# ---------------------------------------------------------------------------------------------------------------
# Data files, rows and registries, through `tuneforge data preview` (strict: the first bad row stops it)
ALPACA = [{"instruction": "Say hi", "input": "", "output": "hi"}]


def sharegpt(*turns):
    return [{"conversations": [{"from": r, "value": v} for r, v in turns]}]


DATA = [
    # (file name, content, registry entry, stage, fragments): rows part one does not cover
    ("a.csv", "question,answer\nx,y\n", {}, "sft", ["a.csv", "instruction"]),
    ("a.parquet", b"not parquet at all", {}, "sft", ["a.parquet"]),
    ("a.json", [{"instruction": "x", "input": "", "output": ["y", "z"]}], {}, "sft", ["a.json", "output", "list"]),
    ("a.json", [{"instruction": "x", "input": ""}], {}, "sft", ["a.json"]),
    ("a.json", [{"instruction": ["x"], "output": "y"}], {}, "sft", ["a.json", "instruction"]),
    ("a.json", [{"conversations": []}], {"formatting": "sharegpt"}, "sft", ["a.json", "conversations"]),
    ("a.json", [{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}],
     {"formatting": "sharegpt", "columns": {"messages": "messages"},
      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
     "sft", ["a.json", "content"]),
    ("a.json", [{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}],
     {"formatting": "sharegpt", "columns": {"messages": "messages"},
      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
     "sft", ["a.json"]),
    ("a.json", [], {}, "sft", ["a.json", "no rows"]),
]


@pytest.mark.parametrize(("file", "content", "entry", "stage", "fragments"), DATA,
                         ids=[f"{d[0]}-{d[3]}-{i}" for i, d in enumerate(DATA)])
def test_data_rows(file, content, entry, stage, fragments, tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data"
    data.mkdir()
    if isinstance(content, bytes):
        (data / file).write_bytes(content)
    elif isinstance(content, str):
        (data / file).write_text(content, encoding="utf-8")
    else:
        write_json(data / file, content)
    write_json(data / "dataset_info.json", {"bad": {"file_name": file, **entry}})
    extra = ["grpo.reward_funcs=[accuracy]"] if stage == "grpo" else []
    expect(["data", "preview", f"model.path={tiny_model_dir}", "data.template=chatml", f"data.dataset_dir={data}",
            "data.dataset=[bad]", f"stage={stage}", f"data.cache_dir={tmp_path / 'cache'}", "--num", "0", *extra],
           capsys, *fragments)


REGISTRIES = [
    ('["a.json"]', ["dataset_info.json", "object"]),
    ('{"bad": {"file_name": "a.json", "colums": {}}}', ["colums", "columns"]),
]


@pytest.mark.parametrize(("registry", "fragments"), REGISTRIES, ids=[str(i) for i in range(len(REGISTRIES))])
def test_dataset_registries(registry, fragments, tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_json(data / "a.json", ALPACA)
    (data / "dataset_info.json").write_text(registry, encoding="utf-8")
    expect(["data", "preview", f"model.path={tiny_model_dir}", "data.template=chatml", f"data.dataset_dir={data}",
            "data.dataset=[bad]", f"data.cache_dir={tmp_path / 'cache'}", "--num", "0"], capsys, *fragments)


def test_a_registry_with_a_bom_loads(tmp_path, tiny_model_dir, capsys):
    """Not a bad input: Windows editors save JSON with a BOM, and data files with one already load."""
    data = tmp_path / "data"
    data.mkdir()
    write_json(data / "a.json", ALPACA)
    (data / "dataset_info.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"ok": {"file_name": "a.json"}}).encode())
    code, text = run(["data", "preview", f"model.path={tiny_model_dir}", "data.template=chatml",
                      f"data.dataset_dir={data}", "data.dataset=[ok]", f"data.cache_dir={tmp_path / 'cache'}",
                      "--num", "0"], capsys)
    assert code == 0 and "1 train rows" in text


# ---------------------------------------------------------------------------------------------------------------
# Command lines: paths that must exist or be creatable, flags with bad values (all before any model loads)
def test_missing_adapter_folder(tmp_path, tiny_model_dir, capsys):
    expect(["train", f"model.path={tiny_model_dir}", f"model.adapter_path=[{tmp_path / 'nope'}]",
            f"output.dir={tmp_path / 'run'}"], capsys, "model.adapter_path", "nope", "does not exist")


def test_output_dir_that_is_a_file(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "taken").write_text("x")
    expect(["train", f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'taken'}"], capsys, "output.dir",
           "taken", "file")


def test_output_dir_under_a_file(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "taken").write_text("x")
    expect(["train", f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'taken' / 'run'}"], capsys,
           "output.dir", "is a file")


def test_missing_model_folder(tmp_path, capsys):
    expect(["train", f"model.path={tmp_path / 'models' / 'none'}"], capsys, "model.path", "does not exist")


def test_model_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"x")
    expect(["chat", f"model.path={tmp_path / 'weights.bin'}"], capsys, "model.path", "is a file")


def test_missing_checkpoint_to_resume(tmp_path, tiny_model_dir, capsys):
    expect(["train", f"model.path={tiny_model_dir}", f"train.resume_from_checkpoint={tmp_path / 'ckpt'}",
            f"output.dir={tmp_path / 'run'}"], capsys, "resume_from_checkpoint", "ckpt")


def test_missing_deepspeed_file(tmp_path, tiny_model_dir, capsys):
    expect(["train", f"model.path={tiny_model_dir}", "--deepspeed", str(tmp_path / "ds.json"),
            f"output.dir={tmp_path / 'run'}"], capsys, "deepspeed", "ds.json")


def test_missing_reward_model(tmp_path, tiny_model_dir, capsys):
    expect(["train", f"model.path={tiny_model_dir}", "stage=ppo", f"reward_model.path={tmp_path / 'rm'}",
            f"output.dir={tmp_path / 'run'}"], capsys, "reward_model", "rm")


def test_export_into_a_full_folder(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    expect(["export", f"model.path={tiny_model_dir}", f"export.dir={tmp_path / 'out'}"], capsys, "export.dir",
           "not empty", "export.overwrite")


@pytest.mark.parametrize(("flags", "fragments"), [
    (["--batch-size", "0"], ["--batch-size 0"]),
    (["--time-limit", "0"], ["--time-limit"]),
    (["--adapter", "nameonly"], ["--adapter", "NAME=PATH"]),
    (["--kv-cache-tokens", "8"], ["--kv-cache-tokens 8"]),
])
def test_api_flags(flags, fragments, tiny_model_dir, capsys):
    expect(["api", f"model.path={tiny_model_dir}", *flags], capsys, *fragments)


def test_compare_without_an_adapter(tiny_model_dir, capsys):
    expect(["chat", f"model.path={tiny_model_dir}", "--compare"], capsys, "--compare", "adapter")


# ---------------------------------------------------------------------------------------------------------------
# API requests (the OpenAI-compatible server), each a 4xx in OpenAI's error shape naming the field
@pytest.fixture(scope="module")
def api(tiny_model_dir):
    from fastapi.testclient import TestClient

    from tuneforge.chat.engine import load_engine
    from tuneforge.config.schema import GenerationConfig, ModelConfig
    from tuneforge.serve.api import create_app

    engine = load_engine(ModelConfig(path=str(tiny_model_dir)), "chatml")
    return TestClient(create_app(engine, "tiny", None, GenerationConfig(max_new_tokens=4)))


HI = [{"role": "user", "content": "hi"}]
REQUESTS = [
    ({"messages": HI}, 400, "model"),
    ({"model": "nope", "messages": HI}, 404, "nope"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]}, 400, "last message"),
    ({"model": "tiny", "messages": [*HI, *HI]}, 400, "alternate"),
    ({"model": "tiny", "messages": HI, "temperature": 9}, 400, "temperature"),
    ({"model": "tiny", "messages": HI, "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "messages": HI, "max_tokens": 10**9}, 400, "context length"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 1100}]}, 400, "context length"),
    ({"model": "tiny", "messages": HI, "n": 0}, 400, "n"),
    ({"model": "tiny", "messages": HI, "n": 99}, 400, "n"),
    ({"model": "tiny", "messages": HI, "stream": "yes"}, 400, "stream"),
    ({"model": "tiny", "messages": HI, "stop": 5}, 400, "stop"),
    ({"model": "tiny", "messages": HI, "tools": "get_weather"}, 400, "tools"),
    ({"model": "tiny", "messages": HI, "seed": "abc"}, 400, "seed"),
]


@pytest.mark.parametrize(("body", "status", "fragment"), REQUESTS, ids=[str(i) for i in range(len(REQUESTS))])
def test_api_requests(api, body, status, fragment):
    response = api.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment.lower() in (error["message"] + " " + str(error.get("param"))).lower(), error
    assert "Traceback" not in response.text


def test_api_body_that_is_not_json(api):
    response = api.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_api_score_on_a_chat_model(api):
    response = api.post("/v1/score/evaluation", json={"model": "tiny", "messages": ["a text"]})
    assert response.status_code == 405 and "reward model" in response.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------------------
# Web UI fields: a form value that cannot work is one message naming the field, before anything launches
@pytest.fixture
def board_ws(tmp_path, tiny_model_dir):
    import shutil

    from tuneforge.webui.workspace import Workspace

    ws = Workspace.at(tmp_path / "board")
    shutil.copytree(tiny_model_dir, ws.models_dir / "tiny")
    write_json(ws.data_dir / "mini.json", ALPACA)
    write_json(ws.data_dir / "dataset_info.json", {"mini": {"file_name": "mini.json"}})
    return ws


FIELDS = [
    ({"learning_rate": -1.0}, ["learning_rate"]),
    ({"batch_size": 0}, ["batch_size"]),
    ({"cutoff_len": 2}, ["cutoff_len"]),
    ({"val_size": -0.5}, ["val_size"]),
    ({"warmup_ratio": 3.0}, ["warmup_ratio"]),
    ({"lora_rank": 0}, ["rank"]),
    ({"logging_steps": 0}, ["logging_steps"]),
    ({"extra_args": "train.batchsize: 2"}, ["batchsize"]),
]


@pytest.mark.parametrize(("changes", "fragments"), FIELDS, ids=[next(iter(c)) for c, _ in FIELDS])
def test_web_ui_fields(changes, fragments, board_ws):
    from tests.webui.conftest import tiny_values
    from tuneforge.errors import ConfigError
    from tuneforge.webui.form import build_config

    values = tiny_values(board_ws, dataset=["mini"], **changes)
    with pytest.raises(ConfigError) as caught:
        build_config(values, board_ws)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_the_corpus_is_large_enough():
    """Both parts together: at least 100 distinct bad inputs."""
    from .test_bad_inputs import CASES

    here = len(OURS) + len(LF) + len(YAMLS) + len(DATA) + len(REGISTRIES) + 9 + 4 + 1 + len(REQUESTS) + 2 + \
        len(FIELDS)
    assert len(CASES) + here >= 100, (len(CASES), here)
