"""Named templates render exactly what each model family's own Jinja template renders."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from tuneforge.data.types import Message
from tuneforge.templates import named_templates
from tuneforge.templates.named import NamedTemplate

JINJA = Path(__file__).parents[1] / "fixtures" / "chat_templates"
TOKENS = json.loads((JINJA / "tokens.json").read_text(encoding="utf-8"))
SYSTEM = "You are a careful assistant."
TURNS = [Message("user", "Hello there!"), Message("assistant", "Hi! How can I help?"),
         Message("user", "What is 2 + 2?"), Message("assistant", "2 + 2 = 4.")]
NO_SYSTEM_ROLE = {"gemma"}
# Families whose Jinja output for a finished conversation is not the sum of its turns:
# phi appends eos after the last turn only.
PROMPT_ONLY = {"phi"}
REFERENCED = sorted(n for n in named_templates().names() if named_templates().get(n).reference)
# Templates that keep LLaMA-Factory 0.9.5's tokens where its text differs from the family's Jinja template; each
# says where and why in its `note` (named.yaml), and test_lf_parity checks their ids against LLaMA-Factory's.
AS_JINJA = [n for n in REFERENCED if not named_templates().get(n).note]


def jinja(family: str, messages: list[Message], system: str | None, generation: bool, **extra) -> str:
    chat = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": m.role, "content": m.content} for m in messages]
    tokens = TOKENS.get(family, {"bos_token": "<s>", "eos_token": "</s>"})
    rendered, _ = render_jinja_template([chat], chat_template=(JINJA / f"{family}.jinja").read_text(encoding="utf-8"),
                                        add_generation_prompt=generation, bos_token=tokens["bos_token"] or "",
                                        eos_token=tokens["eos_token"] or "", **extra)
    return rendered[0]


def named(name: str, family: str, **kwargs) -> NamedTemplate:
    tokens = TOKENS.get(family, {"bos_token": "<s>", "eos_token": "</s>"})
    stub = SimpleNamespace(bos_token=tokens["bos_token"], eos_token=tokens["eos_token"])
    return NamedTemplate(name, named_templates().get(name), stub, **kwargs)


def test_every_family_with_a_known_jinja_template_is_referenced():
    assert {"qwen", "qwen3", "llama2", "llama3", "mistral", "gemma", "chatglm3", "glm4", "yi", "phi"} <= set(
        named_templates().get(n).reference for n in REFERENCED)


def test_every_difference_from_jinja_is_explained():
    assert {n for n in REFERENCED if n not in AS_JINJA} == {"chatglm3", "llama2", "mistral", "yi", "qwen3"}


@pytest.mark.parametrize("name", [*AS_JINJA, "qwen3"])  # qwen3 differs in multi-turn training only
def test_generation_prompt_matches_jinja(name):
    family = named_templates().get(name).reference
    system = None if family in NO_SYSTEM_ROLE else SYSTEM
    extra = {"enable_thinking": False} if family == "qwen3" else {}
    template = named(name, family, enable_thinking=not extra)
    assert template.render_prompt(TURNS[:3], system, None) == jinja(family, TURNS[:3], system, True, **extra)


@pytest.mark.parametrize("name", [n for n in AS_JINJA if named_templates().get(n).reference not in PROMPT_ONLY])
def test_full_conversation_matches_jinja(name):
    family = named_templates().get(name).reference
    system = None if family in NO_SYSTEM_ROLE else SYSTEM
    pairs = named(name, family).render_pairs(TURNS, system, None)
    assert "".join(p + r for p, r in pairs) == jinja(family, TURNS, system, False)


def test_qwen_without_system_uses_its_default_system():
    template = named("qwen", "qwen")
    assert template.render_prompt(TURNS[:1], None, None) == jinja("qwen", TURNS[:1], None, True)


def test_qwen_tools_and_tool_calls_match_jinja():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    messages = [Message("user", "Weather in Paris?"), Message("function", json.dumps(call)),
                Message("observation", '{"temp": 21}')]
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
            {"role": "tool", "content": '{"temp": 21}'}]
    rendered, _ = render_jinja_template([chat], tools=tools, add_generation_prompt=True,
                                        chat_template=(JINJA / "qwen.jinja").read_text(encoding="utf-8"))
    ours = named("qwen", "qwen").render_prompt(messages, None, json.dumps(tools))
    # Qwen's Jinja puts a newline before each tool call after `<|im_start|>assistant`; ours starts the answer
    # after the generation prompt's newline, so the two texts are identical.
    assert ours == rendered[0]


def test_smollm2_is_chatml_with_its_default_system():
    smol_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    template = named("chatml", "smollm2", default_system=smol_system)
    assert template.render_prompt(TURNS[:3], None, None) == jinja("smollm2", TURNS[:3], None, True)
    pairs = template.render_pairs(TURNS, None, None)
    assert "".join(p + r for p, r in pairs) == jinja("smollm2", TURNS, None, False)
