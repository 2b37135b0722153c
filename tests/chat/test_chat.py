"""The inference engine and `tuneforge chat` on the tiny model with a trained adapter."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tuneforge.chat.engine import adapter_folder, cut_at_stop_words, load_engine
from tuneforge.config.schema import GenerationConfig, ModelConfig
from tuneforge.data.types import Message
from tuneforge.errors import ModelError


def test_adapter_path_may_be_run_checkpoint_or_adapter_folder(tiny_run, tmp_path):
    assert adapter_folder(tiny_run) == tiny_run / "adapter"
    assert adapter_folder(tiny_run / "checkpoints" / "step-2") == tiny_run / "checkpoints" / "step-2" / "adapter"
    assert adapter_folder(tiny_run / "adapter") == tiny_run / "adapter"
    with pytest.raises(ModelError, match="holds no LoRA adapter"):
        adapter_folder(tmp_path)


def test_engine_uses_the_run_template_and_base(tiny_run, tiny_model_dir):
    engine = load_engine(ModelConfig(adapter_path=[str(tiny_run)]))
    assert engine.template.name == "chatml" and engine.has_adapter
    gen = GenerationConfig(max_new_tokens=8)
    tuned = engine.generate([Message("user", "Who are you?")], gen)
    again = engine.generate([Message("user", "Who are you?")], gen)
    base = engine.generate([Message("user", "Who are you?")], gen, adapter=False)
    assert tuned == again  # greedy is deterministic
    assert tuned != base  # the adapter changes the answer
    streamed = "".join(engine.stream([Message("user", "Who are you?")], gen))
    assert streamed == tuned


def test_stop_words_cut_the_stream():
    pieces = iter(["Hel", "lo<|im", "_end|>junk"])
    assert "".join(cut_at_stop_words(pieces, ["<|im_end|>"])) == "Hello"
    assert "".join(cut_at_stop_words(iter(["a", "b", "c"]), ["<|im_end|>"])) == "abc"


def test_piped_chat_answers_each_line(tiny_run):
    done = subprocess.run([sys.executable, "-m", "tuneforge", "chat", f"model.adapter_path={tiny_run}",
                           "generation.max_new_tokens=6"], input="Who are you?\n\n你是谁？\n",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    engine = load_engine(ModelConfig(adapter_path=[str(tiny_run)]))
    gen = GenerationConfig(max_new_tokens=6)
    expected = [engine.generate([Message("user", q)], gen) for q in ("Who are you?", "你是谁？")]
    assert all(expected) and done.stdout == "".join(f"{answer}\n" for answer in expected)  # the blank line: none


def test_piped_compare_shows_base_and_tuned(tiny_run):
    done = subprocess.run([sys.executable, "-m", "tuneforge", "chat", "--adapter_name_or_path", str(tiny_run),
                           "--max_new_tokens", "6", "--compare"], input="Who are you?\n",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "[base]" in done.stdout and "[tuned]" in done.stdout and "[prompt] Who are you?" in done.stdout


def test_compare_without_adapter_is_refused(tiny_model_dir, capsys):
    from tuneforge.cli.main import main

    assert main(["chat", f"model.path={tiny_model_dir}", "--compare"]) == 2
    assert "--compare needs an adapter" in capsys.readouterr().err


def test_interactive_chat_keeps_history_clears_and_exits(tiny_run, monkeypatch, capsys):
    from tuneforge.cli import chat_cmd

    engine = load_engine(ModelConfig(adapter_path=[str(tiny_run)]))
    seen: list[int] = []
    original = engine.stream

    def spy(messages, *args, **kwargs):
        seen.append(len(messages))
        return original(messages, *args, **kwargs)

    monkeypatch.setattr(engine, "stream", spy)
    answers = iter(["hello", "again", "clear", "fresh", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert chat_cmd.interactive(engine, GenerationConfig(max_new_tokens=4), compare=False) == 0
    assert seen == [1, 3, 1]  # history grows, then `clear` starts over
    assert capsys.readouterr().out.count("Assistant: ") == 3
