"""Early stopping and load_best_model_at_end, judged against the eval metrics the run itself logged.

Pre-training on text the validation text contradicts: the validation loss first falls a little (the model leaves
its random start) and then rises as the model settles on the training words, so it soon stops improving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tuneforge.config import load
from tuneforge.errors import ConfigError
from tuneforge.run import train
from tuneforge.train.loop import BestModel

from ..conftest import write_json


@pytest.fixture
def conflict_data(dataset_dir: Path) -> Path:
    """train: 'alpha beta alpha beta ...'; validation: 'omega gamma omega gamma ...'."""
    write_json(dataset_dir / "train.json", [{"text": "alpha beta " * 8}] * 4)
    write_json(dataset_dir / "val.json", [{"text": "omega gamma " * 8}] * 4)
    columns = {"columns": {"prompt": "text"}}
    write_json(dataset_dir / "dataset_info.json", {"fit": {"file_name": "train.json", **columns},
                                                   "clash": {"file_name": "val.json", **columns}})
    return dataset_dir


def run_config(tmp_path: Path, model: Path, data: Path, *extra: str):
    return load(None, ["stage=pt", f"model.path={model}", "data.dataset=fit", "data.eval_dataset=clash",
                       f"data.dataset_dir={data}", "data.cutoff_len=32",
                       "train.batch_size=4", "train.gradient_accumulation_steps=1", "train.learning_rate=1e-2",
                       "train.scheduler=constant", "train.max_steps=10", "train.logging_steps=1",
                       "train.eval_steps=1", "train.eval_batch_size=4", "train.precision=fp32",
                       "finetune.lora.rank=4", f"output.dir={tmp_path / 'run'}", *extra])


def logged_evals(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]


def expected_stop(evals: list[tuple[int, float]], patience: int) -> int | None:
    """The step where `patience` evaluations in a row have not beaten the best so far (strictly)."""
    best, bad = None, 0
    for step, value in evals:
        bad = 0 if best is None or value < best else bad + 1
        best = value if best is None or value < best else best
        if bad >= patience:
            return step
    return None


def test_early_stopping_stops_where_the_logged_eval_loss_says(tmp_path, tiny_model_dir, conflict_data):
    run = train(run_config(tmp_path, tiny_model_dir, conflict_data, "train.early_stopping_steps=2",
                           "train.save_steps=0"))
    evals = logged_evals(run)
    stop = expected_stop(evals, 2)
    assert stop is not None and stop < 10  # the validation loss did stop improving
    assert evals[-1][0] == stop  # no evaluation (or step) after the stop
    manifest = json.loads((run / "manifest.json").read_text())["training"]
    assert manifest["stop_reason"] == "early_stopping" and manifest["steps"] == stop
    assert 0.1 < manifest["peak_rss_gb"] < 24  # this process's peak resident memory, in GB
    assert manifest["best_model"]["value"] == min(v for _, v in evals)
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "plots" / "loss.png").is_file()


def test_load_best_model_at_end_keeps_the_best_checkpoints_weights(tmp_path, tiny_model_dir, conflict_data):
    run = train(run_config(tmp_path, tiny_model_dir, conflict_data, "train.max_steps=6",
                           "train.load_best_model_at_end=true", "train.save_steps=1", "train.save_total_limit=1"))
    evals = dict(logged_evals(run))
    best_step = min(evals, key=lambda s: (evals[s], s))  # a checkpoint at every evaluation; step 6 is the final
    assert best_step < 5, evals  # the construction makes an earlier checkpoint the best
    final = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    best = load_file(str(run / "checkpoints" / f"step-{best_step}" / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == best.keys() and all(final[k].equal(best[k]) for k in final)
    manifest = json.loads((run / "manifest.json").read_text())["training"]
    assert manifest["final_weights_step"] == best_step and manifest["stop_reason"] == "completed"
    assert manifest["best_model"]["step"] == best_step
    # save_total_limit=1 still keeps the best checkpoint (it was not the newest when later ones were saved)
    assert (run / "checkpoints" / f"step-{best_step}").is_dir()


def test_best_model_tracker_by_hand():
    train_cfg = load(None, ["train.early_stopping_steps=2", "train.save_steps=1", "data.val_size=0.1"]).train
    best = BestModel.from_config(train_cfg, {})
    # 3 -> 2 improves; 2 again is no strict improvement (1 bad); 2.5 (2 bad): stop at the 4th evaluation
    assert [best.update(s, {"eval_loss": v}, True) for s, v in enumerate([3.0, 2.0, 2.0, 2.5], 1)] == \
        [False, False, False, True]
    assert (best.value, best.step) == (2.0, 2)
    acc_cfg = load(None, ["train.early_stopping_steps=1", "train.save_steps=1",
                          "train.metric_for_best_model=accuracy", "data.val_size=0.1"]).train
    higher = BestModel.from_config(acc_cfg, {})
    assert higher.metric == "eval_accuracy" and higher.greater  # not a loss: greater is better
    assert [higher.update(s, {"eval_accuracy": v}, s != 2) for s, v in enumerate([0.1, 0.5, 0.3], 1)] == \
        [False, False, True]
    # the best value (0.5) is step 2's, whose weights were not saved; of the kept ones (step 1, and step 3 whose
    # weights are final because training stops there) step 3 is better
    assert higher.value == 0.5 and (higher.step, higher.step_value) == (3, 0.3)
    with pytest.raises(ConfigError, match="eval_bleu"):
        bleu = load(None, ["train.early_stopping_steps=1", "train.save_steps=1", "data.val_size=0.1",
                           "train.metric_for_best_model=bleu"]).train
        BestModel.from_config(bleu, {}).update(1, {"eval_loss": 1.0}, True)


def test_llamafactory_keys_and_rules():
    cfg = load(None, [], {"early_stopping_steps": 3, "load_best_model_at_end": True, "metric_for_best_model":
                          "eval_accuracy", "greater_is_better": True, "eval_steps": 10, "save_steps": 20,
                          "val_size": 0.1, "compute_accuracy": True})
    assert (cfg.train.early_stopping_steps, cfg.train.load_best_model_at_end, cfg.train.metric_for_best_model,
            cfg.train.greater_is_better) == (3, True, "eval_accuracy", True)
    with pytest.raises(ConfigError, match="multiple of train.eval_steps"):
        load(None, [], {"load_best_model_at_end": True, "eval_steps": 3, "save_steps": 10, "val_size": 0.1})
    with pytest.raises(ConfigError, match="needs validation data"):
        load(None, [], {"early_stopping_steps": 2, "eval_steps": 5})
