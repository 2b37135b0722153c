"""Slow end-to-end: the GRPO quickstart (README) raises the length reward on the embedded model, writes its reward
plot and sampled completions, and the tuned model answers held-out questions in far fewer words than the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneforge.chat.engine import load_engine
from tuneforge.cli.main import main
from tuneforge.config.schema import GenerationConfig, ModelConfig
from tuneforge.data.types import Message

ROOT = Path(__file__).parents[2]
QUICKSTART = ROOT / "examples" / "grpo_quickstart.yaml"
HELD_OUT = ("Describe yourself in detail.", "What languages do you speak?", "How do you work?")  # not in identity


@pytest.mark.slow
def test_grpo_quickstart_raises_the_reward(tmp_path):
    run = tmp_path / "grpo_quickstart"
    assert main(["train", str(QUICKSTART), f"output.dir={run}"]) == 0
    rewards = [json.loads(line)["reward"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == 20
    # README: the mean reward of the first 3 steps is below 0.4, of the last 5 above 0.9
    assert sum(rewards[:3]) / 3 < 0.4 and sum(rewards[-5:]) / 5 > 0.9, rewards
    assert (run / "plots" / "reward.png").stat().st_size > 0
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == set(range(1, 21))
    tuned = load_engine(ModelConfig(adapter_path=[str(run)]))
    gen = GenerationConfig(max_new_tokens=64)

    def words(adapter: bool) -> float:  # English answers: whitespace words, counted here by hand
        answers = [tuned.generate([Message("user", q)], gen, adapter=adapter) for q in HELD_OUT]
        return sum(len(a.split()) for a in answers) / len(answers)

    base, after = words(False), words(True)
    assert after <= 12 and after < base / 2, (base, after)
