"""The built-in glaive_toolcall_en_demo set trains with every tool format: function-call turns are trained,
observations (tool results) masked, as `tuneforge data preview` shows them."""

from __future__ import annotations

import json

import pytest

from tuneforge.config.schema import DataConfig
from tuneforge.data.encode import IGNORE_INDEX, EncodeOptions, trained_spans
from tuneforge.data.pipeline import encode_examples, load_examples
from tuneforge.templates import get_template, tool_format_names
from tuneforge.templates.base import Token


@pytest.fixture(scope="module")
def glaive():
    return load_examples(DataConfig(dataset=["glaive_toolcall_en_demo"]), "glaive_toolcall_en_demo", "sft", 0).examples


@pytest.fixture(scope="module")
def chatml_tokenizer(tokenizer):
    copy = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    copy.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"], special_tokens=True)
    return copy


@pytest.mark.parametrize("tool_format", sorted(set(tool_format_names()) - {"glm4"}))
def test_function_calls_trained_and_observations_masked(glaive, chatml_tokenizer, tool_format):
    template = get_template("qwen", chatml_tokenizer, tool_format=tool_format)
    rows, report = encode_examples(glaive, template, EncodeOptions(cutoff_len=100_000), "sft")
    assert len(rows) == len(glaive) and not report.truncated
    for example, row in zip(glaive, rows):
        spans = trained_spans(row["input_ids"], row["labels"])
        trained = "".join(chatml_tokenizer.decode(ids) for is_trained, ids in spans if is_trained)
        masked = "".join(chatml_tokenizer.decode(ids) for is_trained, ids in spans if not is_trained)
        for message in example.messages:
            if message.role == "function":
                for call in json.loads(message.content if message.content.startswith("[")
                                       else f"[{message.content}]"):
                    assert call["name"] in trained  # the call is written in the format and trained
            if message.role == "observation":
                assert message.content in masked and message.content not in trained
        assert "# Tools" not in trained and all(t == IGNORE_INDEX for t in row["labels"][:5])


def test_glm4_refuses_parallel_calls_only(glaive, chatml_tokenizer):
    template = get_template("qwen", chatml_tokenizer, tool_format="glm4")
    single = [e for e in glaive if all(not m.content.startswith("[") for m in e.messages if m.role == "function")]
    rows, _ = encode_examples(single, template, EncodeOptions(cutoff_len=100_000), "sft")
    assert len(rows) == len(single)


def test_tools_are_listed_as_openai_functions_for_qwen(glaive, chatml_tokenizer):
    """LLaMA-Factory (like Qwen's own template) lists each tool as {"type": "function", "function": {...}}."""
    template = get_template("qwen", chatml_tokenizer)
    example = next(e for e in glaive if e.tools)
    prompt = "".join(p for p in template.render_pieces(example.messages, example.system, example.tools)[0][0]
                     if not isinstance(p, Token))
    for tool in json.loads(example.tools):
        assert json.dumps({"type": "function", "function": tool}, ensure_ascii=False) in prompt
