"""Slow end-to-end: the quickstart really changes the embedded model's identity (greedy answers), and the README's
chat command shows it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge.chat.engine import load_engine
from tuneforge.cli.main import main
from tuneforge.config import load
from tuneforge.config.schema import GenerationConfig, ModelConfig
from tuneforge.data.types import Message

ROOT = Path(__file__).parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


@pytest.mark.slow
def test_quickstart_teaches_the_new_name_and_author(tmp_path):
    cfg = load(QUICKSTART)
    name, author = cfg.data.identity.name, cfg.data.identity.author
    run = tmp_path / "quickstart"
    assert main(["train", str(QUICKSTART), f"output.dir={run}"]) == 0
    tuned = load_engine(ModelConfig(adapter_path=[str(run)]))
    gen = GenerationConfig(max_new_tokens=48)
    for question in ("Who are you?", "你是谁？"):
        before = tuned.generate([Message("user", question)], gen, adapter=False)
        after = tuned.generate([Message("user", question)], gen)
        assert name not in before, before
        assert name in after, after
    english = tuned.generate([Message("user", "Who are you?")], gen)
    assert author in english, english
    done = subprocess.run([sys.executable, "-m", "tuneforge", "chat", f"model.adapter_path={run}"],
                          input="Who are you?\n", capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0 and name in done.stdout, done.stdout + done.stderr
