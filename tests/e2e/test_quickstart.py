"""Slow end-to-end: the quickstart really changes the embedded model's identity (greedy answers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.chat.engine import generate, load_for_chat
from tuneforge.cli.main import main
from tuneforge.config import load
from tuneforge.data.types import Message

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart.yaml"


@pytest.mark.slow
def test_quickstart_teaches_the_new_name_and_author(tmp_path):
    cfg = load(QUICKSTART)
    name, author = cfg.data.identity.name, cfg.data.identity.author
    run = tmp_path / "quickstart"
    assert main(["train", str(QUICKSTART), f"output.dir={run}"]) == 0
    base = load_for_chat("smollm2-135m-instruct", [], template="auto")
    tuned = load_for_chat(None, [str(run)])
    for question in ("Who are you?", "你是谁？"):
        before = generate(base, [Message("user", question)], system=cfg.data.default_system, max_new_tokens=48)
        after = generate(tuned, [Message("user", question)], max_new_tokens=48)
        assert name not in before
        assert name in after, after
    english = generate(tuned, [Message("user", "Who are you?")], max_new_tokens=48)
    assert author in english, english
