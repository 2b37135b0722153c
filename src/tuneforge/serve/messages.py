"""OpenAI-style chat messages -> canonical turns: prompts to answer (chat completions) and answered
conversations to score (the reward model's /v1/score/evaluation)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from tuneforge.chat.engine import ChatEngine
from tuneforge.data.types import Message
from tuneforge.errors import TuneforgeError
from tuneforge.templates.base import Template
from tuneforge.templates.tools import Call


def openai_tool_calls(template: Template, text: str) -> list[dict[str, Any]]:
    """The answer's tool calls, read in the template's tool format, as OpenAI tool_calls (empty: it calls none)."""
    return as_openai(template.extract_tool_calls(text) or [])


def as_openai(calls: list[Call]) -> list[dict[str, Any]]:
    """(name, JSON arguments) calls as OpenAI tool_calls entries; arguments stay JSON text, as OpenAI sends them."""
    out = []
    for name, arguments in calls:
        decoded = json.loads(arguments)
        text = decoded if isinstance(decoded, str) else arguments  # a model that wrote its arguments as a string
        out.append({"id": f"call_{uuid.uuid4().hex[:16]}", "type": "function",
                    "function": {"name": name, "arguments": text}})
    return out


def parse_turns(raw: list[Any], where: str = "messages") -> tuple[list[Message], str | None]:
    """OpenAI messages (objects with role, content, tool_calls) -> canonical turns, with the system prompt apart."""
    system = None
    messages: list[Message] = []
    for i, m in enumerate(raw):
        content = m.content if isinstance(m.content, str) else "".join(
            part.get("text", "") for part in (m.content or []) if part.get("type") == "text")
        if m.role == "system":
            if i != 0:
                raise TuneforgeError(f"{where}[{i}]: a system message must come first")
            system = content
        elif m.role == "user":
            messages.append(Message("user", content))
        elif m.role in ("tool", "function"):
            messages.append(Message("observation", content))
        elif m.tool_calls:
            calls = [c.get("function", c) for c in m.tool_calls]
            messages.append(Message("function", json.dumps(calls, ensure_ascii=False)))
        else:
            messages.append(Message("assistant", content))
    return messages, system


def check_alternation(messages: list[Message], where: str = "messages") -> None:
    """Turns must alternate prompt (user or tool) and answer, starting with a prompt."""
    for i, message in enumerate(messages):
        prompt = message.role in ("user", "observation")
        if prompt != (i % 2 == 0):
            raise TuneforgeError(f"{where}: turn {i + 1} is '{message.role}' but turns must alternate "
                                 "user (or tool) and assistant after the optional system message")


def to_messages(raw: list[Any]) -> tuple[list[Message], str | None]:
    """A conversation to answer: turns alternate prompt/answer and end with a prompt."""
    messages, system = parse_turns(raw)
    if not messages or messages[-1].role not in ("user", "observation"):
        raise TuneforgeError("messages: the last message must be from the user (or a tool result)")
    check_alternation(messages)
    return messages, system


def to_answered(raw: list[Any], where: str) -> tuple[list[Message], str | None]:
    """A conversation to score: turns alternate prompt/answer and end with the answer being scored."""
    messages, system = parse_turns(raw, where)
    if not messages or messages[-1].role not in ("assistant", "function"):
        raise TuneforgeError(f"{where}: a conversation to score must end with an assistant message (the answer)")
    check_alternation(messages, where)
    return messages, system


def score_sequences(engine: ChatEngine, items: list[Any], max_length: int | None) -> tuple[list[list[int]], bool]:
    """Token ids of each item to score, and whether any was a conversation. A string is scored as LLaMA-Factory
    does (raw text, no template, no special tokens); a messages array is rendered with the trained template exactly
    as training encoded a preference pair's answer."""
    sequences, chats = [], False
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = engine.text_ids(item, max_length)
        else:
            messages, system = to_answered(item, f"messages[{i}]")
            ids = engine.answer_ids(messages, system, None, max_length)
            chats = True
        if not ids:
            raise TuneforgeError(f"messages[{i}]: nothing to score (the text has no tokens)")
        sequences.append(ids)
    return sequences, chats
