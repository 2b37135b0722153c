"""The board's preference stages (rm, dpo, kto): the panel <-> config, the preview of pairs, the curves, the
Evaluate tab's stage, and a tiny dpo run through the handlers."""

from __future__ import annotations

import html
import itertools
import json
import re
import sys

import pytest
import yaml

from tests.webui.conftest import tiny_values, train_handlers
from tuneforge.webui.workspace import PathRefused

PANEL = {"pref_beta": 0.25, "pref_loss": "sigmoid", "pref_ftx": 0.5, "label_smoothing": 0.1, "simpo_gamma": 0.7,
         "ref_model": "models/tiny", "precompute_ref": True, "kto_chosen_weight": 2.0, "kto_rejected_weight": 0.5}


# -- form <-> config -----------------------------------------------------------------------------------------

def test_panel_lands_in_the_chosen_stage_section(workspace):
    from tuneforge.webui.form import build_config, config_tree

    dpo = config_tree(tiny_values(workspace, stage="dpo", **PANEL), workspace)
    assert dpo["dpo"] == {"beta": 0.25, "ftx": 0.5, "label_smoothing": 0.1, "simpo_gamma": 0.7}  # sigmoid: default
    assert dpo["reference"] == {"model": str(workspace.models_dir / "tiny"), "precompute": True}
    assert "kto" not in dpo
    kto = config_tree(tiny_values(workspace, stage="kto", **PANEL), workspace)
    assert kto["kto"] == {"beta": 0.25, "ftx": 0.5, "chosen_weight": 2.0, "rejected_weight": 0.5}
    assert "dpo" not in kto and kto["reference"]["precompute"] is True
    for stage in ("sft", "rm"):
        tree = config_tree(tiny_values(workspace, stage=stage, **PANEL), workspace)
        assert not {"dpo", "kto", "reference"} & set(tree), stage
    # only what differs from the defaults is written: an untouched panel writes nothing
    assert not {"dpo", "kto", "reference"} & set(config_tree(tiny_values(workspace, stage="dpo"), workspace))
    plain_kto = config_tree(tiny_values(workspace, stage="kto", pref_beta=0.1, pref_loss="simpo"), workspace)
    assert "kto" not in plain_kto  # 0.1 is kto's default beta; the dpo loss is not a kto setting
    cfg = build_config(tiny_values(workspace, stage="dpo", dataset=["dpo_en_demo"], **PANEL), workspace)
    assert cfg.stage == "dpo" and cfg.dpo.beta == 0.25 and cfg.reference.precompute
    ipo = build_config(tiny_values(workspace, stage="dpo", pref_loss="ipo"), workspace)
    assert ipo.dpo.loss == "ipo" and ipo.dpo.beta is None  # empty beta: the loss's own default


def test_reference_model_is_confined_like_the_model(workspace):
    from tuneforge.webui.form import build_config

    for escape in ({"ref_model": "/etc"}, {"extra_args": "reference.model=/etc"},
                   {"extra_args": "ref_model_adapters=/etc"}):
        with pytest.raises(PathRefused):
            build_config(tiny_values(workspace, stage="dpo", **escape), workspace)
    cfg = build_config(tiny_values(workspace, stage="dpo", ref_model="Qwen/Qwen2.5-0.5B-Instruct"), workspace)
    assert cfg.reference.model == "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_preference_settings_round_trip_through_save_and_load(workspace, stage):
    from tuneforge.webui.form import PREFERENCE, build_config, load_args, save_args

    panel = {**PANEL, "precompute_ref": stage == "dpo"}  # kto keeps a live reference
    values = tiny_values(workspace, stage=stage, dataset=["dpo_en_demo"], **panel,
                         extra_args="dpo.ld_alpha=0.5\nreference.quantization_bit=8")
    saved = build_config(values, workspace)
    path = save_args(values, workspace, f"pref_{stage}")
    tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert tree["stage"] == stage and tree[stage]["beta"] == 0.25
    loaded = load_args(workspace, path.name)
    for key in PREFERENCE[stage]:
        assert loaded[key] == values[key], key
    assert sorted(loaded["extra_args"].splitlines()) == ["dpo.ld_alpha=0.5", "reference.quantization_bit=8"]
    assert build_config(loaded, workspace) == saved  # Load args then Start trains what was saved


def test_load_args_reads_llamafactory_preference_keys(workspace):
    from tuneforge.webui.form import build_config, load_args

    (workspace.config_dir / "lf_dpo.yaml").write_text(
        "model_name_or_path: smollm2-135m-instruct\nstage: dpo\nfinetuning_type: lora\ndataset: dpo_en_demo\n"
        "template: chatml\npref_beta: 0.2\npref_loss: simpo\npref_ftx: 0.1\nsimpo_gamma: 0.6\n"
        "kto_chosen_weight: 1.5\noutput_dir: runs/lf_dpo\n", encoding="utf-8")
    values = load_args(workspace, "lf_dpo")
    assert values["stage"] == "dpo" and values["pref_beta"] == 0.2 and values["pref_loss"] == "simpo"
    assert values["pref_ftx"] == 0.1 and values["simpo_gamma"] == 0.6 and values["ref_model"] == ""
    # kto's weight is no dpo setting: it stays, as an extra setting; pref_beta/pref_ftx's kto copies are the
    # panel's own fields (the panel puts them into whichever stage is chosen); LF's output_dir also names where
    # LF's prediction files go (eval.lf_dir)
    assert sorted(values["extra_args"].splitlines()) == ['eval.lf_dir="runs/lf_dpo"', "kto.chosen_weight=1.5"]
    cfg = build_config(values, workspace)
    assert (cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.ftx, cfg.dpo.simpo_gamma) == (0.2, "simpo", 0.1, 0.6)
    assert cfg.kto.chosen_weight == 1.5
    (workspace.config_dir / "lf_kto.yaml").write_text(
        "model_name_or_path: smollm2-135m-instruct\nstage: kto\ndataset: kto_en_demo\npref_beta: 0.3\n"
        "kto_chosen_weight: 1.5\nkto_rejected_weight: 0.8\nref_model: models/tiny\n", encoding="utf-8")
    values = load_args(workspace, "lf_kto")
    assert (values["pref_beta"], values["kto_chosen_weight"], values["kto_rejected_weight"]) == (0.3, 1.5, 0.8)
    assert values["ref_model"] == "models/tiny"
    assert values["extra_args"] == "" and values["pref_loss"] == "sigmoid"
    cfg = build_config(values, workspace)
    assert (cfg.kto.beta, cfg.kto.chosen_weight, cfg.kto.rejected_weight) == (0.3, 1.5, 0.8)
    assert cfg.reference.model == str(workspace.models_dir / "tiny")


# -- strings -------------------------------------------------------------------------------------------------

def test_preference_fields_are_in_the_form_and_translated(board):
    from tuneforge.webui.form import PREFERENCE_KEYS
    from tuneforge.webui.i18n import MESSAGES, STRINGS, text
    from tuneforge.webui.tabs_train import TRAIN_KEYS

    translated = {key for _, key, _ in board.translated}
    for key in [*PREFERENCE_KEYS, "pref_panel"]:
        assert key in translated and text(key, "en") != text(key, "zh"), key
        assert any("\u4e00" <= ch <= "\u9fff" for ch in STRINGS[key][1]), key
    assert set(PREFERENCE_KEYS) <= set(TRAIN_KEYS) and set(PREFERENCE_KEYS) <= set(board.fields)
    assert board.fields["pref_loss"].choices == [(n, n) for n in ("sigmoid", "hinge", "ipo", "kto_pair", "orpo",
                                                                   "simpo")]
    for part in ("row", "chosen", "rejected", "desirable", "undesirable"):
        assert MESSAGES[f"part_{part}"][0] == part


# -- the live plot -------------------------------------------------------------------------------------------

def _job_over(tmp_path, records):
    from tuneforge.webui.runner import TrainJob, wait_for

    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    job = TrainJob([sys.executable, "-c", "pass"], tmp_path, run_dir, run_dir / "train.log")
    return wait_for(job, ("finished", "failed"), 30)


def test_plot_frame_has_reward_curves_for_dpo_records(tmp_path):
    from tuneforge.webui.tabs_train import loss_frame

    records = [{"step": s, "loss": 0.7 - s / 10, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s,
                "rewards/accuracies": s / 4, "rewards/margins": 0.2 * s, "logps/chosen": -20.0,
                "logps/rejected": -25.0, "lr": 1e-4} for s in (1, 2, 3)]
    records.append({"step": 3, "eval_loss": 0.5, "eval_rewards/accuracies": 1.0})  # eval records are not drawn
    frame = loss_frame(_job_over(tmp_path, records).losses)
    assert list(frame.columns) == ["step", "series", "value"]
    curves = {name: list(zip(group["step"], group["value"])) for name, group in frame.groupby("series")}
    assert curves == {"loss": [(s, 0.7 - s / 10) for s in (1, 2, 3)],
                      "rewards/accuracies": [(s, s / 4) for s in (1, 2, 3)],
                      "rewards/margins": [(s, 0.2 * s) for s in (1, 2, 3)]}
    rm = loss_frame([{"step": 1, "loss": 0.6, "accuracy": 0.5}, {"step": 2, "loss": 0.5, "accuracy": 1.0}])
    assert sorted(set(rm["series"])) == ["accuracy", "loss"]
    sft = loss_frame([{"step": 1, "loss": 2.0}])
    assert list(sft["series"]) == ["loss"] and loss_frame([]).empty


# -- data preview --------------------------------------------------------------------------------------------

def _rows_of(shown_html: str) -> list[tuple[str, list[str]]]:
    """(heading, marked texts) of each shown sequence."""
    pieces = shown_html.split('<div class="tf-row">')[1:]
    return [(re.search(r'class="tf-row-head">(.*?)</div>', p).group(1),
             re.findall(r'<mark class="trained">(.*?)</mark>', p, re.S)) for p in pieces]


def _expected_marks(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    """The decoded runs of consecutive trained positions (label != -100), escaped as the page shows them."""
    runs = itertools.groupby(zip(ids, labels), key=lambda pair: pair[1] != -100)
    return [html.escape(tokenizer.decode([t for t, _ in run])) for trained, run in runs if trained]


def test_encoded_html_marks_exactly_the_trained_tokens(tokenizer):
    from tuneforge.webui.actions import encoded_html

    ids = tokenizer("Q: hi <b> A: yes", add_special_tokens=False)["input_ids"]
    cut = len(ids) - 2
    shown = encoded_html({"input_ids": ids, "labels": [-100] * cut + ids[cut:], "origin": "f: row 1"}, tokenizer)
    marked = shown.split('<mark class="trained">')[1].split("</mark>")[0]
    assert marked == tokenizer.decode(ids[cut:]).replace("<", "&lt;").replace(">", "&gt;")
    assert "&lt;b&gt;" in shown and "2 trained" in shown


def test_preview_of_a_dpo_pair_marks_the_trained_tokens_of_both_answers(workspace):
    from tuneforge.data.build import build_datasets
    from tuneforge.models.load import load_tokenizer
    from tuneforge.templates import get_template
    from tuneforge.webui.actions import preview_data
    from tuneforge.webui.form import build_config

    values = tiny_values(workspace, stage="dpo", dataset=["dpo_en_demo"], max_samples=2, cutoff_len=256)
    shown = preview_data(values, workspace, 1)
    cfg = build_config(values, workspace)
    template = get_template("chatml", load_tokenizer(cfg.model))
    encoded = build_datasets(cfg.data, "pairwise", template, cfg.train.seed).train
    assert shown.counts["encoded"] == 2 and [r["origin"] for r in shown.raw] == list(encoded["origin"])
    sequences = _rows_of(shown.encoded_html)
    assert len(sequences) == 4  # each pair: chosen, then rejected
    for i, (row, raw) in enumerate(zip(encoded, shown.raw)):
        for j, side in enumerate(("chosen", "rejected")):
            head, marks = sequences[2 * i + j]
            labels = row[f"{side}_labels"]
            trained = sum(1 for t in labels if t != -100)
            assert head == html.escape(f"{raw['origin']} [{side}: {len(labels)} tokens, {trained} trained]")
            assert marks == _expected_marks(row[f"{side}_input_ids"], labels, template.tokenizer)
            assert html.escape(raw[side]["value"]) in "".join(marks)  # the answer, not the prompt, is trained
            assert html.escape(raw["conversations"][-1]["value"]) not in "".join(marks)


def test_preview_of_kto_rows_names_them_in_the_page_language(board, workspace):
    values = tiny_values(workspace, stage="kto", dataset=["dpo_en_demo"], max_samples=2, cutoff_len=256)
    handlers = train_handlers(board)
    board.relabel("zh")
    raw, shown, summary, page = handlers.preview(*[values[k] for k in handlers.keys], 1)
    heads = [head for head, _ in _rows_of(shown)]
    assert len(heads) == 4 and ["正样本" in h for h in heads] == [True, False, True, False]
    assert all("负样本" in h for h in heads[1::2]) and "原始数据 " in summary
    assert len(raw) == 2  # a pair split into a desirable and an undesirable row is one raw row
    assert all(h.startswith(html.escape(r["origin"])) for h, r in zip(heads[::2], raw))


# -- Evaluate tab --------------------------------------------------------------------------------------------

def test_evaluate_tab_passes_the_stage_and_its_settings(workspace, monkeypatch):
    import tuneforge.evaluate.run as run
    from tuneforge.webui.actions import evaluate
    from tuneforge.webui.app import create_app

    seen = {}

    def fake_evaluate(cfg, compare_base=False):
        seen["cfg"] = cfg
        return {"tuned": {"loss": {"loss": 0.5, "rewards/accuracies": 1.0}}}

    monkeypatch.setattr(run, "evaluate", fake_evaluate)
    values = tiny_values(workspace, stage="dpo", pref_beta=0.3, pref_loss="hinge")
    ev = {"eval_dataset": ["dpo_en_demo"], "eval_modes": ["loss"], "eval_dir": "runs/eval_dpo"}
    rows, _, _ = evaluate(values, ev, workspace)
    cfg = seen["cfg"]
    assert (cfg.stage, cfg.dpo.beta, cfg.dpo.loss) == ("dpo", 0.3, "hinge")
    assert rows[1:] == [["loss loss", 0.5], ["loss rewards/accuracies", 1.0]]
    # the page passes the Train tab's stage and panel to the Evaluate tab's button
    demo, board = create_app(workspace)
    run_eval = board.buttons["run_eval"]._id
    fn = next(f for f in demo.fns.values() if any(target[0] == run_eval for target in f.targets))
    inputs = {c._id for c in fn.inputs}
    assert board.fields["stage"]._id in inputs and board.fields["pref_beta"]._id in inputs


# -- a real run ----------------------------------------------------------------------------------------------

def test_start_poll_and_finish_a_tiny_dpo_run(board, workspace):
    from tuneforge.webui.runner import wait_for

    values = tiny_values(workspace, stage="dpo", dataset=["dpo_en_demo"], max_samples=4, max_steps=2,
                         cutoff_len=96, pref_beta=0.2, output_dir="runs/dpo")
    handlers = train_handlers(board)
    handlers.start(*[values[k] for k in handlers.keys])
    status = wait_for(board.job, ("finished", "failed"), 240)
    assert status.state == "finished", status.log_tail
    progress, line, log, frame, timer, adapters = handlers.poll()
    assert 'data-state="finished"' in progress and 'data-step="2"' in progress
    for series in ("loss", "rewards/accuracies", "rewards/margins"):
        assert list(frame[frame["series"] == series]["step"]) == [1, 2], series
    resolved = yaml.safe_load((workspace.runs_dir / "dpo" / "config.yaml").read_text(encoding="utf-8"))
    assert resolved["stage"] == "dpo" and resolved["dpo"]["beta"] == 0.2
    assert "runs/dpo" in adapters["choices"]
