"""The board built in-process: strings, paths, form <-> config, the training child process, and the handlers."""

from __future__ import annotations

import json
import shutil
import sys
import time

import pytest
import yaml

from tests.webui.conftest import tiny_values, train_handlers
from tuneforge.errors import ConfigError, DataError
from tuneforge.webui.workspace import PathRefused

# -- language ------------------------------------------------------------------------------------------------

def test_every_string_has_both_languages():
    from tuneforge.webui.i18n import MESSAGES, STRINGS

    for key, (en, zh) in {**STRINGS, **MESSAGES}.items():
        assert en.strip() and zh.strip(), key
        assert en.count("{") == zh.count("{"), f"{key}: the two languages fill different fields"
    cjk = [k for k, (_, zh) in STRINGS.items() if any("\u4e00" <= ch <= "\u9fff" for ch in zh)]
    assert len(cjk) >= len(STRINGS) - 4  # only names such as LoRA/DoRA/rsLoRA stay as they are


def test_every_labelled_component_is_translated_and_switches_live(workspace):
    import gradio as gr

    from tuneforge.webui.app import create_app
    from tuneforge.webui.i18n import text

    demo, board = create_app(workspace)
    translated = {id(c) for c, _, _ in board.translated}
    for block in demo.blocks.values():
        if isinstance(block, gr.components.Component) and block.label:
            assert id(block) in translated, f"untranslated label {block.label!r}"
        if isinstance(block, gr.Button):
            assert id(block) in translated, f"untranslated button {block.value!r}"
    updates = board.relabel("zh")
    assert len(updates) == len(board.translated) + len(board.live)
    for (_, key, attr), update in zip(board.translated, updates):
        assert update[attr] == text(key, "zh")
    live = {id(c): u["value"] for (c, _), u in zip(board.live, updates[len(board.translated):])}
    assert live[id(board.fields["status"])] == "就绪。"
    assert live[id(board.fields["model_status"])] == "未加载模型。"
    checks = next(c for c, _ in board.live if c.elem_id == "tf-export-checks")
    assert list(live[id(checks)].columns) == ["导出文件", "最大 logit 差值", "贪心解码一致率", "容差", "结果"]
    assert board.say("idle") == "就绪。"
    board.relabel("en")
    assert board.say("idle") == "Ready."


# -- working folders -----------------------------------------------------------------------------------------

def test_paths_outside_the_working_folders_are_refused(workspace):
    assert workspace.inside("runs/a", workspace.runs_dir, "output folder") == workspace.runs_dir / "a"
    for bad in ("runs/../../etc", "/etc/passwd", "data/../runs/x"):
        with pytest.raises(PathRefused, match="outside the web UI's working folder"):
            workspace.inside(bad, workspace.runs_dir if bad.startswith("runs") or bad.startswith("/") else
                             workspace.data_dir, "folder")
    assert workspace.model_path("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert workspace.model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert workspace.model_path("models/tiny") == str(workspace.models_dir / "tiny")
    with pytest.raises(PathRefused, match="model folder"):
        workspace.model_path("/etc")
    assert workspace.local_models() == ["models/tiny"]


def test_symlinks_placed_by_the_owner_are_followed(workspace, tiny_model_dir):
    (workspace.models_dir / "linked").symlink_to(tiny_model_dir, target_is_directory=True)
    assert workspace.model_path("models/linked") == str(workspace.models_dir / "linked")
    with pytest.raises(PathRefused):
        workspace.model_path("models/linked/../../../etc")


def test_extra_settings_apply_and_stay_confined(workspace):
    from tuneforge.webui.form import build_config

    cfg = build_config(tiny_values(workspace, extra_args="train.weight_decay=0.01\n# a comment\nwarmup_steps=3\n"),
                       workspace)
    assert cfg.train.weight_decay == 0.01 and cfg.train.warmup_steps == 3
    with pytest.raises(ConfigError, match="weight_dekay"):
        build_config(tiny_values(workspace, extra_args="train.weight_dekay=0.01"), workspace)
    for escape in ("output.dir=/tmp/x", "output_dir=/tmp/x", "data.cache_dir=/var/tmp", "eval.dir=../x",
                   "adapter_name_or_path=/etc"):
        with pytest.raises(PathRefused):
            build_config(tiny_values(workspace, extra_args=escape), workspace)


def test_form_refuses_an_output_folder_outside_runs(workspace):
    from tuneforge.webui.form import train_command

    with pytest.raises(PathRefused, match="output.dir '/tmp/elsewhere' is outside"):
        train_command(tiny_values(workspace, output_dir="/tmp/elsewhere"), workspace)
    with pytest.raises(PathRefused, match="data.dataset_dir"):
        train_command(tiny_values(workspace, dataset_dir="../outside"), workspace)


# -- form <-> config -----------------------------------------------------------------------------------------

def test_form_becomes_the_config_train_reads(workspace):
    from tuneforge.config import load
    from tuneforge.webui.form import build_config, train_command

    cfg = build_config(tiny_values(workspace), workspace)
    assert cfg.model.path == str(workspace.models_dir / "tiny")
    assert cfg.finetune.method == "lora" and cfg.finetune.lora.rank == 4 and cfg.finetune.lora.alpha is None
    assert cfg.data.dataset == ["identity"] and cfg.data.identity.name == "Orbweaver"
    assert cfg.train.max_steps == 3 and cfg.train.gradient_accumulation_steps == 2
    assert cfg.output.dir == str(workspace.runs_dir / "tiny") and cfg.data.packing is None
    command = train_command(tiny_values(workspace), workspace)
    assert command.argv == [sys.executable, "-m", "tuneforge", "train", str(workspace.config_dir / "tiny.yaml")]
    assert command.shown().startswith(f"# tuneforge train {workspace.config_dir / 'tiny.yaml'}")
    command.config_path.write_text(command.yaml_text, encoding="utf-8")
    assert load(command.config_path) == cfg  # the YAML shown is exactly what the run reads


def test_method_panels_map_to_their_sections(workspace):
    from tuneforge.webui.form import build_config, config_tree

    qlora = build_config(tiny_values(workspace, method="qlora-4bit", quant_type="fp4", lora_alpha=32,
                                     lora_targets="q_proj, v_proj"), workspace)
    assert qlora.model.quantization_bit == 4 and qlora.model.quantization_type == "fp4"
    assert qlora.finetune.lora.alpha == 32 and qlora.finetune.lora.targets == ["q_proj", "v_proj"]
    freeze = config_tree(tiny_values(workspace, method="freeze", freeze_layers=-1, freeze_modules="mlp"),
                         workspace)
    assert freeze["finetune"] == {"method": "freeze", "freeze": {"trainable_layers": -1,
                                                                 "trainable_modules": ["mlp"]}}
    assert "quantization_bit" not in freeze["model"]
    oft = config_tree(tiny_values(workspace, method="oft"), workspace)
    assert oft["finetune"] == {"method": "oft"} and "quantization_bit" not in oft["model"]
    full = build_config(tiny_values(workspace, method="full", packing="true", resume=True), workspace)
    assert full.finetune.method == "full" and full.data.packing is True
    assert full.train.resume_from_checkpoint == "auto"


def test_deepspeed_choice_picks_a_shipped_config_and_round_trips(workspace):
    from pathlib import Path

    from tuneforge.webui.form import build_config, form_values

    cfg = build_config(tiny_values(workspace, ds_stage="3", ds_offload=True), workspace)
    config = json.loads(Path(cfg.train.deepspeed).read_text(encoding="utf-8"))
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    values = form_values(cfg, workspace)
    assert (values["ds_stage"], values["ds_offload"]) == ("3", True) and "deepspeed" not in values["extra_args"]
    assert build_config(tiny_values(workspace, ds_stage="none"), workspace).train.deepspeed is None
    # a DeepSpeed file of one's own comes from the data folder, like other files the board reads
    with pytest.raises(PathRefused):
        build_config(tiny_values(workspace, extra_args="train.deepspeed=/etc/ds.json"), workspace)


def test_bad_setting_is_one_message(workspace):
    from tuneforge.webui.form import train_command

    with pytest.raises(ConfigError, match="web UI form: .*scheduler"):
        train_command(tiny_values(workspace, scheduler="sideways"), workspace)


def test_save_and_load_args_round_trip(workspace):
    from tuneforge.webui.form import load_args, save_args

    values = tiny_values(workspace, method="qlora-8bit", lora_rank=16, report_to=["tensorboard"],
                         adapters=[], packing="false")
    path = save_args(values, workspace, "mine")
    assert path == workspace.config_dir / "mine.yaml"
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["model"]["quantization_bit"] == 8
    loaded = load_args(workspace, "mine.yaml")
    for key in ("model", "method", "lora_rank", "report_to", "dataset", "output_dir", "packing", "max_steps",
                "identity_name", "learning_rate"):
        assert loaded[key] == values[key], key
    with pytest.raises(PathRefused):
        load_args(workspace, "../../etc/hosts")


def test_load_args_keeps_settings_the_form_has_no_field_for(workspace):
    from tuneforge.webui.form import build_config, load_args, save_args

    extra = "train.weight_decay=0.01\ndata.default_system=Be brief.\ngeneration.temperature=0.7"
    saved = build_config(tiny_values(workspace, extra_args=extra), workspace)
    save_args(tiny_values(workspace, extra_args=extra), workspace, "extras")
    loaded = load_args(workspace, "extras")
    assert sorted(loaded["extra_args"].splitlines()) == ['data.default_system="Be brief."',
                                                          "generation.temperature=0.7", "train.weight_decay=0.01"]
    assert build_config(loaded, workspace) == saved  # Load args then Start trains what was saved


def test_load_args_reads_a_llamafactory_yaml(workspace):
    from tuneforge.webui.form import load_args

    (workspace.config_dir / "lf.yaml").write_text(
        "model_name_or_path: smollm2-135m-instruct\nstage: sft\nfinetuning_type: lora\nlora_rank: 16\n"
        "dataset: identity\ntemplate: chatml\ncutoff_len: 256\nlearning_rate: 2.0e-4\n"
        "output_dir: runs/lf\n", encoding="utf-8")
    values = load_args(workspace, "lf")
    assert values["lora_rank"] == 16 and values["dataset"] == ["identity"] and values["template"] == "chatml"
    assert values["learning_rate"] == 2e-4 and values["cutoff_len"] == 256


# -- the training child process ------------------------------------------------------------------------------

def test_log_tail_and_error_line(tmp_path):
    from tuneforge.webui.runner import error_line, log_tail

    log = tmp_path / "train.log"
    log.write_bytes(b"plan\ntrain: 10%\rtrain: 50%\rtrain: 90%\nerror: dataset 'x': file not found: a.json\n")
    assert log_tail(log) == "plan\ntrain: 90%\nerror: dataset 'x': file not found: a.json"
    assert error_line(log_tail(log)) == "dataset 'x': file not found: a.json"
    assert error_line("Traceback (most recent call last):\n  ...\nRuntimeError: boom") == "RuntimeError: boom"


def _fake_run(tmp_path, body: str):
    from tuneforge.webui.runner import TrainJob

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = ("import json, sys, time, pathlib\nrun = pathlib.Path(sys.argv[1])\n"
              "(run / 'manifest.json').write_text(json.dumps({'data': {'plan': {'total_steps': 3}}}))\n" + body)
    return TrainJob([sys.executable, "-c", script, str(run_dir)], tmp_path, run_dir, run_dir / "train.log")


def test_job_reports_progress_losses_and_finish(tmp_path):
    from tuneforge.webui.runner import wait_for

    job = _fake_run(tmp_path, "with open(run / 'metrics.jsonl', 'a') as f:\n"
                              "    for s in (1, 2, 3):\n"
                              "        f.write(json.dumps({'step': s, 'loss': 3.0 - s, 'eta': 3 - s}) + '\\n')\n"
                              "        f.flush(); time.sleep(0.3)\n"
                              "    f.write('{\"step\": 4, \"lo')\n")
    status = wait_for(job, ("finished", "failed"), 30)
    assert status.state == "finished" and status.step == 3 and status.total == 3
    assert [p["loss"] for p in status.losses] == [2.0, 1.0, 0.0]  # the half-written line is skipped


def test_job_failure_shows_the_child_message(tmp_path):
    from tuneforge.webui.runner import wait_for

    job = _fake_run(tmp_path, "print('loading'); print('error: dataset \\'x\\': file not found', file=sys.stderr)"
                              "; sys.exit(2)")
    status = wait_for(job, ("finished", "failed"), 30)
    assert status.state == "failed" and status.error == "dataset 'x': file not found"


def test_abort_interrupts_the_child(tmp_path):
    from tuneforge.webui.runner import wait_for

    job = _fake_run(tmp_path, "try:\n    (run / 'ready').touch()\n    time.sleep(60)\n"
                              "except KeyboardInterrupt:\n    (run / 'interrupted').touch()\n    sys.exit(130)\n")
    deadline = time.monotonic() + 30
    while not (tmp_path / "run" / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    started = time.monotonic()
    job.abort()
    assert time.monotonic() - started < 10
    assert (tmp_path / "run" / "interrupted").exists() and job.process.returncode == 130  # SIGINT, not a kill
    assert wait_for(job, ("aborted",), 5).state == "aborted"


def test_real_train_child_error_reaches_the_status(workspace):
    """A setting only the child can reject (a preference stage on an sft dataset) is shown with tuneforge's
    message."""
    from tuneforge.webui.form import train_command
    from tuneforge.webui.runner import TrainJob, wait_for

    command = train_command(tiny_values(workspace, stage="sft", output_dir="runs/child"), workspace)
    text = command.yaml_text.replace("stage: sft", "stage: dpo")
    command.config_path.write_text(text, encoding="utf-8")
    run_dir = workspace.runs_dir / "child"
    started = time.monotonic()
    job = TrainJob(command.argv, workspace.root, run_dir, run_dir / "train.log")
    status = wait_for(job, ("finished", "failed"), 120)
    assert status.state == "failed" and "dpo" in status.error, status.log_tail
    assert "Traceback" not in status.log_tail
    assert time.monotonic() - started < 90


# -- handlers ------------------------------------------------------------------------------------------------

def test_preview_pages_raw_and_encoded_rows(workspace):
    from tuneforge.webui.actions import PAGE_SIZE, preview_data

    shown = preview_data(tiny_values(workspace, dataset=["mini", "identity"]), workspace, 1)
    assert shown.pages == -(-(3 + 8) // PAGE_SIZE) and len(shown.raw) == PAGE_SIZE  # max_samples=8 of identity
    assert shown.encoded_html.count('class="tf-row"') == PAGE_SIZE
    heads = [h.split("[")[0].strip() for h in shown.encoded_html.split('class="tf-row-head">')[1:]]
    assert heads == [r["origin"] for r in shown.raw]  # each raw row beside its own encoding
    last = preview_data(tiny_values(workspace, dataset=["mini"]), workspace, 99)
    assert last.page == 1 and sorted(r["instruction"] for r in last.raw) == ["Say blue", "Say green", "Say red"]
    for word in ("red", "green", "blue"):
        assert f'<mark class="trained">{word} {word}' in last.encoded_html
    with pytest.raises(DataError, match="choose at least one dataset"):
        preview_data(tiny_values(workspace, dataset=[]), workspace, 1)


def test_dataset_files_outside_the_dataset_folder_are_refused(workspace, tmp_path):
    from tests.conftest import write_json
    from tuneforge.webui.actions import check_datasets, preview_data
    from tuneforge.webui.form import build_config

    outside = write_json(tmp_path / "elsewhere" / "rows.json", [{"instruction": "a", "output": "b"}])
    write_json(workspace.data_dir / "dataset_info.json", {"far": {"file_name": str(outside)}})
    with pytest.raises(PathRefused, match="dataset 'far' file"):
        preview_data(tiny_values(workspace, dataset=["far"]), workspace, 1)
    check_datasets(build_config(tiny_values(workspace, dataset=["identity"]), workspace), workspace, ["identity"])
    inline = "data.inline={near: {hf_hub_url: %s}}"
    for location in (str(tmp_path), "../elsewhere", "json"):
        values = tiny_values(workspace, dataset=["near"], extra_args=inline % location)
        with pytest.raises(PathRefused, match="not a hub id"):
            preview_data(values, workspace, 1)


def test_start_with_a_missing_dataset_file_fails_at_once(board, workspace):
    from tuneforge.webui.tabs_train import TRAIN_KEYS

    values = tiny_values(workspace, dataset=["broken"], output_dir="runs/never")
    handlers = train_handlers(board)
    started = time.monotonic()
    progress, status, log, plot, timer, adapters, command = handlers.start(*[values[k] for k in handlers.keys])
    assert time.monotonic() - started < 15  # "within seconds": nothing is launched
    assert 'data-state="failed"' in progress and "missing.json" in status and "Failed" in status
    assert board.job is None and not (workspace.runs_dir / "never" / "train.log").exists()
    assert set(TRAIN_KEYS) <= set(values)


def test_start_poll_and_finish_a_tiny_run(board, workspace):
    from tuneforge.webui.runner import wait_for

    values = tiny_values(workspace, output_dir="runs/handler")
    handlers = train_handlers(board)
    handlers.start(*[values[k] for k in handlers.keys])
    busy = handlers.start(*[values[k] for k in handlers.keys])
    assert "already in progress" in busy[1]
    status = wait_for(board.job, ("finished", "failed"), 240)
    assert status.state == "finished", status.log_tail
    progress, line, log, frame, timer, adapters = handlers.poll()
    assert 'data-state="finished"' in progress and 'data-step="3"' in progress
    assert list(frame["step"]) == [1, 2, 3] and "runs/handler" in line
    assert workspace.adapters() == ["runs/handler"] and adapters["choices"] == ["runs/handler"]
    assert (workspace.config_dir / "handler.yaml").is_file()


@pytest.fixture
def adapter_in_workspace(workspace, tiny_run):
    shutil.copytree(tiny_run, workspace.runs_dir / "tiny_a", ignore=shutil.ignore_patterns("checkpoints"))
    return "runs/tiny_a"


def test_chat_session_streams_and_compares(workspace, adapter_in_workspace):
    from tuneforge.errors import ModelError
    from tuneforge.webui.chat import ChatSession, generation, respond

    session = ChatSession()
    gen = generation("", 0.0, 1.0, 6)
    with pytest.raises(ModelError, match="load a model first"):
        list(respond(session, "hi", [], [], gen, False))
    described = session.load(tiny_values(workspace, adapters=[adapter_in_workspace]), workspace)
    assert described == {"model": "models/tiny", "adapters": "tiny_a", "template": "chatml"}
    frames = list(respond(session, "Who are you?", [], [], gen, compare=True))
    tuned, base = frames[-1]
    assert [m["role"] for m in tuned] == ["user", "assistant"] and tuned[1]["content"]
    assert [m["role"] for m in base] == ["user", "assistant"] and base[1]["content"]
    engine = session.engine
    from tuneforge.chat.engine import BASE
    from tuneforge.data.types import Message

    assert tuned[1]["content"] == engine.generate([Message("user", "Who are you?")], gen)
    assert base[1]["content"] == engine.generate([Message("user", "Who are you?")], gen, adapter=BASE)
    session.unload()
    assert session.engine is None


def test_evaluate_tab_writes_results(workspace, adapter_in_workspace):
    from tuneforge.webui.actions import evaluate

    values = tiny_values(workspace, adapters=[adapter_in_workspace])
    ev = {"eval_dataset": ["mini"], "eval_modes": ["loss", "predict"], "eval_cutoff_len": 64,
          "eval_max_samples": 3, "eval_batch": 2, "eval_max_new_tokens": 4, "eval_dir": "runs/eval_t",
          "compare_base": True}
    rows, files, folder = evaluate(values, ev, workspace)
    assert rows[0] == ["metric", "tuned", "base"]
    assert {r[0] for r in rows[1:]} >= {"loss loss", "loss perplexity", "predict bleu-4"}
    assert folder == workspace.runs_dir / "eval_t"
    assert {p.split("/")[-1] for p in files} >= {"predictions.jsonl", "predictions_base.jsonl", "report.md",
                                                 "results.json"}
    with pytest.raises(PathRefused):
        evaluate(values, {**ev, "eval_dir": "/tmp/x"}, workspace)
    with pytest.raises(PathRefused, match="task name"):
        evaluate(values, {**ev, "eval_modes": ["choice"], "eval_task": "../../etc"}, workspace)
    outside = workspace.root.parent / "outside.json"
    outside.write_text('[{"instruction": "a", "output": "b"}]', encoding="utf-8")
    (workspace.data_dir / "dataset_info.json").write_text(json.dumps({"far": {"file_name": str(outside)}}))
    with pytest.raises(PathRefused, match="dataset 'far' file"):
        evaluate(values, {**ev, "eval_dataset": ["far"]}, workspace)


def test_export_tab_verifies(workspace, adapter_in_workspace):
    from tuneforge.webui.actions import export

    values = tiny_values(workspace, adapters=[adapter_in_workspace])
    ex = {"export_dir": "exports/t", "export_size": 0.001, "export_dtype": "fp32", "modelfile": True,
          "gguf": ["f16"], "verify": True, "export_overwrite": False}
    report, rows = export(values, ex, workspace)
    assert report.passed and report.folder == workspace.exports_dir / "t"
    assert "Modelfile" in report.files and "model-f16.gguf" in report.files
    assert len([f for f in report.files if f.endswith(".safetensors")]) > 1  # sharded at 1 MB
    assert [r[0] for r in rows] == [c.artifact for c in report.checks] and all(r[-1] is True for r in rows)
    with pytest.raises(PathRefused, match="export folder"):
        export(values, {**ex, "export_dir": "runs/x"}, workspace)


# -- the command ---------------------------------------------------------------------------------------------

def test_webui_command_defaults_and_environment(monkeypatch):
    from tuneforge.cli.main import build_parser

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    from tuneforge.cli.webui_cmd import port_from_env

    args = build_parser().parse_args(["webui"])
    assert (args.host, args.port, args.share, args.root) == ("127.0.0.1", None, False, ".")
    assert port_from_env() == 7860
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = build_parser().parse_args(["webui", "--lang", "zh", "--port", "8001"])
    assert (args.host, args.port, args.lang, port_from_env()) == ("0.0.0.0", 8001, "zh", 7999)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    with pytest.raises(ConfigError, match="GRADIO_SERVER_PORT='http'"):
        port_from_env()
    build_parser().parse_args(["train", "x.yaml"])  # a bad port setting never breaks other commands


def test_auth_is_user_and_password():
    from tuneforge.cli.webui_cmd import parse_auth

    assert parse_auth("ann:s3cret:x") == ("ann", "s3cret:x") and parse_auth(None) is None
    for bad in ("ann", "ann:", ":pw"):
        with pytest.raises(ConfigError, match="USER:PASSWORD"):
            parse_auth(bad)


def test_webui_command_serves_the_four_tabs(tmp_path):
    import json
    import subprocess
    import urllib.request

    from tuneforge.train.distributed import free_port

    port = free_port()
    log = open(tmp_path / "webui.log", "wb")  # noqa: SIM115 - closed with the process below
    process = subprocess.Popen([sys.executable, "-m", "tuneforge", "webui", "--root", str(tmp_path), "--port",
                                str(port), "--lang", "zh"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, config = time.monotonic() + 90, None
        while time.monotonic() < deadline and config is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as reply:
                    config = json.loads(reply.read())
            except OSError:
                assert process.poll() is None, (tmp_path / "webui.log").read_text()
                time.sleep(1)
        assert config is not None
        labels = {c.get("props", {}).get("label") for c in config["components"]}
        assert {"训练", "评估与预测", "对话", "导出"} <= labels
        assert {"data", "runs", "configs", "exports", "models"} <= {p.name for p in tmp_path.iterdir()}
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def test_plan_button_prints_the_plan_or_the_error(board, workspace):
    handlers = train_handlers(board)
    values = tiny_values(workspace, output_dir="runs/planned")
    shown = handlers.plan(*[values[k] for k in handlers.keys])
    assert "training plan" in shown and "peak memory" in shown and "two measured steps" in shown, shown
    assert "3 per epoch" in shown or "= 3 " in shown
    assert not (workspace.runs_dir / "planned" / "metrics.jsonl").exists()  # a plan trains nothing
    bad = tiny_values(workspace, output_dir="runs/planned", stage="pt", dataset=["mini"], model="models/nope")
    failed = handlers.plan(*[bad[k] for k in handlers.keys])
    assert failed.startswith("Error:") and "models/nope" in failed and "Traceback" not in failed


def test_refreshing_datasets_reads_the_folder_again(board, workspace):
    from tests.conftest import write_json
    from tuneforge.webui.tabs_train import dataset_choices

    assert "late" not in dataset_choices(board, "data")["choices"]
    write_json(workspace.data_dir / "dataset_info.json", {"late": {"file_name": "mini.json"}})
    assert "late" in dataset_choices(board, "data")["choices"]
    assert dataset_choices(board, "../elsewhere") == {"__type__": "update"}  # refused: the list stays


def test_a_busy_port_is_one_message(workspace):
    import socket

    from tuneforge.webui.app import create_app, launch

    demo, _ = create_app(workspace)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="cannot serve on 127.0.0.1:.*choose another --port"):
            launch(demo, workspace, "127.0.0.1", taken.getsockname()[1])


def test_an_unexpected_failure_is_one_line_on_the_page_and_a_traceback_in_the_log(board, workspace):
    try:
        {}["missing"]
    except KeyError as err:
        shown = board.error(err)
    assert "unexpected KeyError" in shown and "board.log" in shown and "\n" not in shown.strip()
    logged = workspace.log_file.read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in logged and "KeyError: 'missing'" in logged
