"""The chat template saved with adapters and exports renders what training rendered, for every named template
written out as Jinja (kinds plain and llama2), with and without a system prompt, over one and several turns."""

from __future__ import annotations

import copy

import pytest

from tuneforge.data.types import Message
from tuneforge.templates import get_template
from tuneforge.templates.jinja import training_chat_template
from tuneforge.templates.named import load_formats

WRITTEN = sorted(name for name, f in load_formats().items() if f.kind in ("plain", "llama2"))
CONVERSATIONS = [[Message("user", "Hi there")],
                 [Message("user", "Q1"), Message("assistant", "A1"), Message("user", "Q2 with\nnew line")]]


@pytest.mark.parametrize("name", WRITTEN)
def test_written_template_renders_as_training(name, tokenizer):
    template = get_template(name, tokenizer, "The run's own default system.", True, None)
    saved = copy.copy(tokenizer)
    saved.chat_template = training_chat_template(template)
    for system in (None, "Be brief."):
        for turns in CONVERSATIONS:
            chat = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": m.role, "content": m.content} for m in turns]
            assert saved.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
                template.render_prompt(turns, system, None), (name, system, len(turns))


def test_templates_from_the_tokenizer_get_the_training_default_system(tokenizer):
    template = get_template("auto", tokenizer, "Trained system.", True, None)
    saved = copy.copy(tokenizer)
    saved.chat_template = training_chat_template(template)
    rendered = saved.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "Trained system." in rendered and "SmolLM" not in rendered
    explicit = saved.apply_chat_template([{"role": "system", "content": "Mine."}, {"role": "user", "content": "hi"}],
                                         tokenize=False, add_generation_prompt=True)
    assert "Mine." in explicit and "Trained system." not in explicit


def test_run_folders_carry_the_training_template_and_plain_file_modes(tiny_run, tokenizer):
    """Run files get the mode a plain open gives (umask), not the 0600 of the temporary files they went through."""
    import os
    import stat

    from transformers import AutoTokenizer

    mask = os.umask(0)
    os.umask(mask)
    for path in ("adapter/adapter_model.safetensors", "adapter/chat_template.jinja", "config.yaml", "manifest.json",
                 "checkpoints/step-2/trainable.safetensors", "checkpoints/step-2/adapter/adapter_model.safetensors"):
        assert stat.S_IMODE((tiny_run / path).stat().st_mode) == 0o666 & ~mask, path

    from tuneforge.chat.engine import load_engine
    from tuneforge.config.schema import ModelConfig

    saved = AutoTokenizer.from_pretrained(tiny_run / "adapter")
    engine = load_engine(ModelConfig(adapter_path=[str(tiny_run)]))
    turns = [Message("user", "Who are you?")]
    rendered = saved.apply_chat_template([{"role": "user", "content": "Who are you?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert rendered == engine.template.render_prompt(turns, None, None)
