"""`tuneforge eval`: loss equals training's eval loss, predictions resume after a crash, choice scoring by hand."""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge.chat.engine import load_engine
from tuneforge.cli.main import main
from tuneforge.config import load
from tuneforge.evaluate import choice as mc
from tuneforge.evaluate.run import choice_mode, predict_mode, read_predictions

from ..conftest import train_tiny_run


def test_loss_mode_equals_the_training_loops_eval_loss(tmp_path, tiny_model_dir):
    run = train_tiny_run(tmp_path / "run", tiny_model_dir, "data.eval_dataset=alpaca_en_demo",
                         "train.eval_steps=3", "data.max_samples=6")
    trained = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    during = [r for r in trained if "eval_loss" in r][-1]["eval_loss"]
    out = tmp_path / "eval"
    assert main(["eval", f"model.path={tiny_model_dir}", f"model.adapter_path={run}", "data.template=chatml",
                 "data.eval_dataset=alpaca_en_demo", "data.max_samples=6", "data.cutoff_len=64",
                 f"eval.dir={out}", "eval.modes=loss"]) == 0
    after = json.loads((out / "results.json").read_text())["model"]["loss"]
    assert after["loss"] == pytest.approx(during, abs=1e-4)
    assert 0 <= after["token_accuracy"] <= 1 and after["perplexity"] > 1


def test_predictions_resume_after_a_crash(tmp_path, tiny_model_dir, tiny_run, monkeypatch):
    cfg = load(None, [f"model.path={tiny_model_dir}", f"model.adapter_path={tiny_run}", "data.eval_dataset=identity",
                      "data.max_samples=6", "generation.max_new_tokens=4", "eval.batch_size=2"])
    engine = load_engine(cfg.model, "chatml")
    clean = tmp_path / "clean.jsonl"
    predict_mode(engine, True, cfg, clean)
    crashed = tmp_path / "crashed.jsonl"
    lines = clean.read_text(encoding="utf-8").splitlines()
    crashed.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10], encoding="utf-8")  # 3 rows + half a row
    (tmp_path / "crashed.jsonl.key").write_text((tmp_path / "clean.jsonl.key").read_text())  # same run's key
    calls = []
    original = engine.generate_batch
    monkeypatch.setattr(engine, "generate_batch", lambda convs, *a: calls.append(len(convs)) or original(convs, *a))
    summary = predict_mode(engine, True, cfg, crashed)
    assert sum(calls) == 3  # only the missing rows were generated again
    assert read_predictions(crashed) == read_predictions(clean) and summary["rows"] == 6
    calls.clear()
    other = load(None, [f"model.path={tiny_model_dir}", f"model.adapter_path={tiny_run}",
                        "data.eval_dataset=identity", "data.max_samples=6", "generation.max_new_tokens=2",
                        "eval.batch_size=2"])
    assert predict_mode(engine, True, other, crashed)["rows"] == 6
    assert sum(calls) == 6  # other settings: the earlier answers are not reused


def test_choice_scoring_matches_hand_computed_likelihoods(tiny_model_dir, tiny_run):
    cfg = load(None, [f"model.path={tiny_model_dir}", f"model.adapter_path={tiny_run}", "eval.n_shot=1"])
    engine = load_engine(cfg.model, "chatml")
    questions, shots = mc.load_task(mc.task_folder("mmlu_demo", None))
    letters = [engine.tokenizer.encode(x, add_special_tokens=False)[0] for x in "ABCD"]
    hits = 0
    for q in questions:
        turns, system = mc.build_prompt(q, shots[q.subject], 1, "en")
        ids = engine.prompt_ids(turns, system)
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1]
        logp = torch.log_softmax(logits.float(), -1)[letters]
        assert mc.score_question(engine.model, ids, letters) == pytest.approx(logp.tolist(), abs=1e-6)
        hits += "ABCD"[int(logp.argmax())] == q.answer
    result = choice_mode(engine, True, cfg)
    assert result["questions"] == len(questions) == 10
    assert result["accuracy"] == pytest.approx(100 * hits / len(questions))
    assert set(result["subjects"]) == {"elementary_mathematics", "geography"}


@pytest.mark.parametrize(("task", "count", "subjects"), [("mmlu_demo", 10, 2), ("ceval_demo", 10, 2),
                                                         ("cmmlu_demo", 10, 2)])
def test_every_demo_layout_loads(task, count, subjects):
    questions, shots = mc.load_task(mc.task_folder(task, None))
    assert len(questions) == count and len(shots) == subjects
    assert all(q.answer in "ABCD" and all(q.options) for q in questions)
    assert all(len(examples) == 2 for examples in shots.values())


def test_compare_base_writes_a_report_with_deltas(tmp_path, tiny_model_dir, tiny_run, capsys):
    out = tmp_path / "report"
    assert main(["eval", f"model.path={tiny_model_dir}", f"model.adapter_path={tiny_run}", "data.template=chatml",
                 "data.eval_dataset=identity", "data.max_samples=4", "generation.max_new_tokens=4",
                 "eval.modes=loss,predict,choice", "eval.n_shot=1", f"eval.dir={out}", "--compare-base"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"tuned", "base"}
    assert results["tuned"]["loss"]["loss"] != results["base"]["loss"]["loss"]
    report = (out / "report.md").read_text()
    assert "| metric | tuned | base | delta |" in report and "choice accuracy" in report
    assert "## Sample predictions" in report and "- base:" in report
    assert (out / "predictions.jsonl").is_file() and (out / "predictions_base.jsonl").is_file()
    assert "written:" in capsys.readouterr().out


def test_llamafactory_eval_keys_map():
    cfg = load(None, [], {"task": "mmlu_test", "task_dir": "evaluation", "n_shot": "5", "lang": "en"})
    assert (cfg.eval.task, cfg.eval.task_dir, cfg.eval.n_shot, cfg.eval.modes) == ("mmlu", "evaluation", 5,
                                                                                 ["choice"])
    assert load(None, [], {"do_predict": "true", "predict_with_generate": "true"}).eval.modes == ["predict"]


def test_missing_benchmark_folder_names_the_fix(tmp_path):
    from tuneforge.errors import DataError

    with pytest.raises(DataError, match="built-in tasks: ceval_demo, cmmlu_demo, mmlu_demo"):
        mc.task_folder("mmlu", str(tmp_path))


def test_predictions_at_the_end_of_training_when_asked(tmp_path, tiny_model_dir):
    run = train_tiny_run(tmp_path / "run", tiny_model_dir, "eval.after_training=true", "eval.modes=predict",
                         "data.eval_dataset=identity", "generation.max_new_tokens=4")
    records = read_predictions(run / "eval" / "predictions.jsonl")
    assert len(records) == 8 and (run / "eval" / "report.md").is_file()
