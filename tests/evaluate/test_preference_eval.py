"""`tuneforge eval` of rm, dpo and kto weights; every expected number comes from transformers/peft/safetensors
directly (full logits, output_hidden_states, the saved head read with safetensors)."""

from __future__ import annotations

import json
import math

import pytest

from tuneforge.cli.main import main
from tuneforge.config.schema import DataConfig

from .preference_runs import peft_model, reference_logp, reference_score, saved_head

PAIRS = 6
DATA = ["data.eval_dataset=dpo_en_demo", f"data.max_samples={PAIRS}", "data.cutoff_len=64"]


def encoded_pairs(tokenizer) -> list[dict]:
    """The evaluation pairs as the data layer encodes them (the input; not what is under test here)."""
    from tuneforge.data.build import build_datasets
    from tuneforge.templates import get_template

    data = DataConfig(dataset=["dpo_en_demo"], template="chatml", max_samples=PAIRS, cutoff_len=64)
    return build_datasets(data, "pairwise", get_template("chatml", tokenizer), 42).train.to_list()


def run_eval(tmp_path, tiny_model_dir, run, *extra: str) -> dict:
    out = tmp_path / "eval"
    assert main(["eval", f"model.path={tiny_model_dir}", f"model.adapter_path={run}", *DATA, f"eval.dir={out}",
                 *extra]) == 0
    return json.loads((out / "results.json").read_text())


def test_rm_loss_and_predict_match_independent_scores(tmp_path, tiny_model_dir, rm_run, tokenizer):
    # no stage= given: the run's tuneforge_run.json says rm
    results = run_eval(tmp_path, tiny_model_dir, rm_run, "eval.modes=loss,predict")["model"]
    model, head = peft_model(tiny_model_dir, rm_run / "adapter"), saved_head(rm_run / "adapter")
    rows = encoded_pairs(tokenizer)
    chosen = [reference_score(model, head, r["chosen_input_ids"]) for r in rows]
    rejected = [reference_score(model, head, r["rejected_input_ids"]) for r in rows]
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / PAIRS
    loss = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(chosen, rejected)) / PAIRS
    assert 0 < accuracy  # the trained head prefers some chosen answers
    assert results["loss"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert results["loss"]["loss"] == pytest.approx(loss, abs=1e-4)
    assert results["predict"]["accuracy"] == pytest.approx(accuracy, abs=1e-6) and results["predict"]["rows"] == PAIRS
    lines = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [line["origin"] for line in lines] == [r["origin"] for r in rows]
    assert [line["chosen"] for line in lines] == pytest.approx([round(c, 2) for c in chosen], abs=0.011)
    assert [line["rejected"] for line in lines] == pytest.approx([round(r, 2) for r in rejected], abs=0.011)
    assert all(set(line) == {"origin", "chosen", "rejected"} for line in lines)


def test_rm_compare_base_reports_what_the_base_has(tmp_path, tiny_model_dir, rm_run):
    results = run_eval(tmp_path, tiny_model_dir, rm_run, "eval.modes=loss,predict", "--compare-base")
    assert "accuracy" in results["tuned"]["loss"] and "predict" in results["tuned"]
    # the base of a LoRA reward model has no value head: only the log-prob figures, no scores
    assert "accuracy" not in results["base"]["loss"] and "predict" not in results["base"]
    assert "preference_accuracy" in results["base"]["loss"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| loss accuracy |" in report and "| predict accuracy |" in report
    assert not (tmp_path / "eval" / "predictions_base.jsonl").exists()


def test_dpo_compare_base_preference_accuracy_matches_full_logits(tmp_path, tiny_model_dir, dpo_run, tokenizer):
    from transformers import AutoModelForCausalLM

    results = run_eval(tmp_path, tiny_model_dir, dpo_run, "eval.modes=loss", "--compare-base")
    rows = encoded_pairs(tokenizer)
    models = {"tuned": peft_model(tiny_model_dir, dpo_run / "adapter"),
              "base": AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()}
    for name, model in models.items():
        margins = [reference_logp(model, r["chosen_input_ids"], r["chosen_labels"])
                   - reference_logp(model, r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
        got = results[name]["loss"]
        assert got["preference_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / PAIRS, abs=1e-6), name
        assert got["logp_margin"] == pytest.approx(sum(margins) / PAIRS, abs=1e-3), name
    tuned, base = results["tuned"]["loss"], results["base"]["loss"]
    # the reference is the base: the base against itself has zero rewards and loss -log sigmoid(0) = ln 2
    assert base["loss"] == pytest.approx(math.log(2), abs=1e-6) and base["rewards/margins"] == 0
    # dpo on these very pairs raised the margin over the reference, and rewards/margins says by how much
    assert tuned["logp_margin"] > base["logp_margin"]
    assert tuned["rewards/margins"] == pytest.approx(0.1 * (tuned["logp_margin"] - base["logp_margin"]), abs=1e-3)
    assert "| loss preference_accuracy |" in (tmp_path / "eval" / "report.md").read_text()


def test_kto_loss_mode_runs_with_the_base_as_reference(tmp_path, tiny_model_dir, dpo_run):
    out = tmp_path / "eval"
    assert main(["eval", "stage=kto", f"model.path={tiny_model_dir}", f"model.adapter_path={dpo_run}",
                 "data.eval_dataset=kto_en_demo", "data.max_samples=6", "data.cutoff_len=64", f"eval.dir={out}",
                 "--compare-base"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected"} <= set(results["tuned"]["loss"])
    assert results["base"]["loss"]["rewards/chosen"] == 0  # the base against itself
    assert "preference_accuracy" not in results["tuned"]["loss"]  # kto_en_demo holds no pairs


def test_a_stage_taken_from_the_run_explains_a_data_mismatch(tmp_path, tiny_model_dir, dpo_run, capsys):
    assert main(["eval", f"model.path={tiny_model_dir}", f"model.adapter_path={dpo_run}",
                 "data.eval_dataset=identity", "data.max_samples=2", f"eval.dir={tmp_path}"]) == 2
    assert "set stage=sft" in capsys.readouterr().err


def test_dpo_predict_answers_each_prompt_with_the_chosen_answer_as_reference(tmp_path, tiny_model_dir, dpo_run):
    from tuneforge.data.catalog import BUILTIN_DIR

    raw = json.loads((BUILTIN_DIR / "dpo_en_demo.json").read_text(encoding="utf-8"))[:3]
    out = tmp_path / "eval"
    assert main(["eval", "stage=dpo", f"model.path={tiny_model_dir}", f"model.adapter_path={dpo_run}",
                 "data.eval_dataset=dpo_en_demo", "data.max_samples=3", "eval.modes=[predict]",
                 "generation.max_new_tokens=4", f"eval.dir={out}"]) == 0
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in lines] == [row["conversations"][-1]["value"] for row in raw]
    assert [r["label"] for r in lines] == [row["chosen"]["value"] for row in raw]
