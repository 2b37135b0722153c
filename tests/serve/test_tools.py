"""The API returns OpenAI tool_calls for every tool format, read from hand-written model answers."""

from __future__ import annotations

import json

import pytest

from tuneforge.chat.engine import Completion
from tuneforge.serve.api import choice
from tuneforge.serve.messages import openai_tool_calls
from tuneforge.templates import get_template, tool_format_names
from tuneforge.templates.tools import get_tool_format

PARIS = ("get_weather", '{"city": "Paris", "unit": "celsius"}')
NEWS = ("search_news", '{"topics": ["巴黎", "weather"], "limit": 3}')
# What a model trained with each format writes when it calls get_weather(city=Paris, unit=celsius).
ANSWERS = {
    "default": 'Action: get_weather\nAction Input: {"city": "Paris", "unit": "celsius"}',
    "glm4": 'get_weather\n{"city": "Paris", "unit": "celsius"}',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
    "qwen": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
    "ling": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
    "qwen3_5": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=unit>\n"
               "celsius\n</parameter>\n</function>\n</tool_call>",
    "glm4_moe": "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>unit"
                "</arg_key>\n<arg_value>celsius</arg_value>\n</tool_call>",
    "seed_oss": "<seed:tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n<parameter=unit>"
                "celsius</parameter>\n</function>\n</seed:tool_call>",
    "minimax1": '<tool_calls>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
                "</tool_calls>",
    "minimax2": '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
                '<parameter name="unit">celsius</parameter>\n</invoke>\n</minimax:tool_call>',
    "lfm2": '<|tool_call_start|>[get_weather(city="Paris", unit="celsius")]<|tool_call_end|>',
}


def test_every_tool_format_has_a_hand_written_answer():
    assert set(ANSWERS) == set(tool_format_names())


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_hand_written_call_is_read(name):
    assert get_tool_format(name).read(ANSWERS[name]) == [PARIS]


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_plain_answer_is_no_call(name):
    assert get_tool_format(name).read("It is sunny in Paris today.") is None


@pytest.mark.parametrize("name", sorted(set(ANSWERS) - {"glm4"}))  # glm4 writes one call per turn
def test_what_training_writes_reads_back(name):
    fmt = get_tool_format(name)
    assert fmt.read(fmt.write([PARIS, NEWS])) == [PARIS, NEWS]


def test_glm4_refuses_parallel_calls_with_a_message():
    with pytest.raises(Exception, match="one function call per turn"):
        get_tool_format("glm4").write([PARIS, NEWS])


@pytest.mark.parametrize(("template", "tool_format"), [("qwen", None), ("llama3", None), ("mistral", None),
                                                        ("glm4", None), ("qwen3_5", None), ("default", None),
                                                        ("seed_oss", None), ("chatml", "mistral")])
def test_api_choice_returns_openai_tool_calls(template, tool_format):
    chosen = get_template(template, None, tool_format=tool_format)
    answer = ANSWERS[tool_format or named_format(template)]
    result = choice(0, Completion(text=answer, finish_reason="stop"), json.dumps([{"name": "get_weather"}]), chosen)
    assert result["finish_reason"] == "tool_calls"
    (call,) = result["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": PARIS[1]}


def test_without_tools_offered_the_answer_stays_text():
    chosen = get_template("qwen", None)
    result = choice(0, Completion(text=ANSWERS["qwen"], finish_reason="stop"), None, chosen)
    assert result["message"]["content"] == ANSWERS["qwen"]


def test_calls_in_another_format_are_not_misread():
    assert openai_tool_calls(get_template("llama3", None), ANSWERS["qwen"]) == []


def named_format(template: str) -> str:
    return get_template(template, None).formats.tool_format
