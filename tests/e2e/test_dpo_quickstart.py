"""Slow end-to-end: the DPO quickstart (README) moves the embedded model's preferences on held-out pairs, as
`tuneforge eval --compare-base` reports, and it answers with its new name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneforge.chat.engine import load_engine
from tuneforge.cli.main import main
from tuneforge.config import load
from tuneforge.config.schema import GenerationConfig, ModelConfig
from tuneforge.data.types import Message

ROOT = Path(__file__).parents[2]
TRAIN = ROOT / "examples" / "dpo_quickstart.yaml"
EVAL = ROOT / "examples" / "dpo_quickstart_eval.yaml"


@pytest.mark.slow
def test_dpo_quickstart_raises_held_out_preference_accuracy(tmp_path):
    run = tmp_path / "dpo_quickstart"
    assert main(["train", str(TRAIN), f"output.dir={run}"]) == 0
    out = tmp_path / "eval"
    assert main(["eval", str(EVAL), f"model.adapter_path=[{run}]", f"eval.dir={out}", "--compare-base"]) == 0
    results = json.loads((out / "results.json").read_text())
    tuned, base = results["tuned"]["loss"], results["base"]["loss"]
    assert tuned["pairs"] == base["pairs"] == 16  # identity_pref_eval: questions never trained on
    # the base model prefers its own answers; the tuned one the chosen ones (README: 0.125 -> 0.9375)
    assert base["preference_accuracy"] <= 0.25 and tuned["preference_accuracy"] >= 0.75
    assert tuned["rewards/accuracies"] >= 0.75 and tuned["logp_margin"] > base["logp_margin"] + 50
    name = load(TRAIN).data.identity.name
    engine = load_engine(ModelConfig(adapter_path=[str(run)]))
    answer = engine.generate([Message("user", "Who are you?")], GenerationConfig(max_new_tokens=40))
    assert name in answer, answer
