"""Declarative named templates (LLaMA-Factory names), their formats kept in named.yaml."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tuneforge.data.types import Message
from tuneforge.errors import TemplateError
from tuneforge.templates.base import Pair, Template

DATA_FILE = Path(__file__).with_name("named.yaml")
EMPTY_THINK = "<think>\n\n</think>\n\n"
DEFAULT_TOOLS = "\n\nYou have access to the following tools:\n{tools}"


@dataclass(frozen=True)
class Formats:
    """Format strings with {content}, {bos}, {eos} (and {tools}) placeholders."""

    user: str
    assistant: str
    system: str = "{content}\n\n"
    prefix: str = ""
    separator: str = ""
    observation: str | None = None
    function: str | None = None
    function_call: str = "{content}"
    tools: str = DEFAULT_TOOLS
    default_system: str = ""
    system_in_user: bool = False
    thinking: bool = False
    stop_words: list[str] = field(default_factory=list)
    reference: str | None = None  # the model family whose Jinja template tests compare against


def load_formats() -> dict[str, Formats]:
    """Every named template's formats from the package data file."""
    raw = yaml.safe_load(DATA_FILE.read_text(encoding="utf-8"))
    names = {f.name for f in fields(Formats)}
    table = {}
    for name, entry in raw.items():
        unknown = set(entry) - names
        if unknown:
            raise ValueError(f"{DATA_FILE}: template '{name}' has unknown keys {sorted(unknown)}")
        table[name] = Formats(**entry)
    return table


class NamedTemplate(Template):
    """A template rendered from format strings."""

    def __init__(self, name: str, formats: Formats, tokenizer: Any, enable_thinking: bool = True,
                 default_system: str | None = None) -> None:
        super().__init__(tokenizer)
        self.name = name
        self.formats = formats
        self.enable_thinking = enable_thinking
        self.default_system = formats.default_system if default_system is None else default_system
        self.stop_words = list(formats.stop_words) or ([self._eos] if self._eos else [])

    @property
    def _eos(self) -> str:
        return self.tokenizer.eos_token or "" if self.tokenizer is not None else "</s>"

    @property
    def _bos(self) -> str:
        return self.tokenizer.bos_token or "" if self.tokenizer is not None else "<s>"

    def fill(self, fmt: str, content: str = "", tools: str = "") -> str:
        """Substitute placeholders; content goes in last so braces inside it are never touched."""
        text = fmt.replace("{bos}", self._bos).replace("{eos}", self._eos).replace("{tools}", tools)
        return text.replace("{content}", content)

    def render_pairs(self, messages: list[Message], system: str | None, tools: str | None) -> list[Pair]:
        """(prompt, response) texts; system, tools and the prefix open the first prompt."""
        return self._pairs(messages, system, tools, final=True)

    def render_history(self, messages: list[Message], system: str | None, tools: str | None) -> list[Pair]:
        """Pairs of earlier turns as they appear before a new prompt (no think block on the last answer)."""
        return self._pairs(messages, system, tools, final=False)

    def _pairs(self, messages: list[Message], system: str | None, tools: str | None, final: bool) -> list[Pair]:
        pairs = []
        for i in range(0, len(messages) - 1, 2):
            prompt = self._prompt_text(messages, i, system, tools)
            pairs.append((prompt, self._response_text(messages[i + 1])))
        if self.formats.thinking and pairs and final:
            # Like Qwen3's own template: only the final answer carries a (possibly empty) think block.
            prompt, response = pairs[-1]
            if not self.enable_thinking:
                pairs[-1] = (prompt + EMPTY_THINK, response)
            elif "<think>" not in response:
                pairs[-1] = (prompt, EMPTY_THINK + response)
        return pairs

    def render_prompt(self, messages: list[Message], system: str | None, tools: str | None) -> str:
        """History plus the last prompt turn, ending where the answer starts."""
        history = "".join(p + r for p, r in self.render_history(messages[:-1], system, tools))
        prompt = history + self._prompt_text(messages, len(messages) - 1, system, tools)
        return prompt + EMPTY_THINK if self.formats.thinking and not self.enable_thinking else prompt

    def _prompt_text(self, messages: list[Message], i: int, system: str | None, tools: str | None) -> str:
        f = self.formats
        message = messages[i]
        system_text = self._system_text(system, tools) if i == 0 else ""
        content = message.content
        if f.system_in_user and system_text:
            content, system_text = system_text + content, ""
        if message.role == "observation":
            turn = self.fill(f.observation or f.user, content)
        else:
            turn = self.fill(f.user, content)
        lead = self.fill(f.prefix) if i == 0 else self.fill(f.separator)
        return lead + system_text + turn

    def _system_text(self, system: str | None, tools: str | None) -> str:
        f = self.formats
        content = system if system is not None else self.default_system
        if tools:
            listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in json.loads(tools))
            tools_text = self.fill(f.tools, tools=listing)
            content = content + tools_text if content else tools_text.lstrip("\n")
        return self.fill(f.system, content) if content else ""

    def _response_text(self, message: Message) -> str:
        f = self.formats
        if message.role == "function":
            calls = _calls(message.content)
            body = "\n".join(self.fill(f.function_call, json.dumps(c, ensure_ascii=False)) for c in calls)
            return self.fill(f.function or f.assistant, body)
        return self.fill(f.assistant, message.content)

    def describe(self) -> dict[str, Any]:
        """Formats and stop words (for `templates show`)."""
        return {"name": self.name, "stop_words": self.stop_words, "default_system": self.default_system}


def _calls(content: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(content)
    except json.JSONDecodeError:
        raise TemplateError(f"a function-call turn must be JSON {{\"name\": ..., \"arguments\": ...}}, got "
                            f"{content[:60]!r}") from None
    calls = data if isinstance(data, list) else [data]
    out = []
    for call in calls:
        if isinstance(call, dict) and "function" in call:  # OpenAI tool_calls form
            call = call["function"]
        if not isinstance(call, dict) or "name" not in call:
            raise TemplateError(f"a function call needs a 'name', got {json.dumps(call)[:60]}")
        args = call.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        out.append({"name": call["name"], "arguments": args})
    return out
