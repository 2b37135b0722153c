"""Declarative named templates (LLaMA-Factory names), their formats kept in named.yaml.

Each format is a list of pieces, as in LLaMA-Factory: a text with a {content} placeholder, or {bos}, {eos},
{token: X} (one token looked up by name). Pieces are tokenized one by one, so ids match LLaMA-Factory 0.9.5's
exactly (tests/templates/test_lf_parity.py checks every name against fixtures LLaMA-Factory itself made).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from tuneforge.data.types import Message
from tuneforge.errors import TemplateError
from tuneforge.templates.base import Pair, PiecePair, Side, Template, Token
from tuneforge.templates.tools import Call, ToolFormat, get_tool_format

DATA_FILE = Path(__file__).with_name("named.yaml")
RawPiece = str | dict[str, Any]
LF_PARITY = "LLaMA-Factory 0.9.5, token-identical (fixture)"


@dataclass(frozen=True)
class Formats:
    """One template's pieces and switches; a missing format takes LLaMA-Factory's default for it."""

    user: list[RawPiece] = field(default_factory=lambda: ["{content}"])
    assistant: list[RawPiece] | None = None  # default: content then eos (content only with efficient_eos)
    system: list[RawPiece] = field(default_factory=lambda: ["{content}"])
    function: list[RawPiece] | None = None  # a tool-call turn; default: the assistant format
    observation: list[RawPiece] | None = None  # a tool result; default: the user format
    prefix: list[RawPiece] = field(default_factory=list)
    kind: Literal["plain", "llama2", "reasoning", "glm47"] = "plain"  # llama2: system inside the first user turn
    tool_format: str = "default"
    default_system: str = ""
    stop_words: list[str] = field(default_factory=list)
    replace_eos: bool = False  # the first stop word is the eos the formats place (LLaMA-Factory's replace_eos)
    efficient_eos: bool = False
    thought_words: tuple[str, str] = ("<think>\n", "\n</think>\n\n")
    tool_call_words: tuple[str, str] = ("<tool_call>", "</tool_call>")
    provenance: str = LF_PARITY
    reference: str | None = None  # the model family whose Jinja template tests compare against
    note: str | None = None  # where and why this template differs from the family's own Jinja template

    @property
    def reasoning(self) -> bool:
        return self.kind in ("reasoning", "glm47")

    def assistant_pieces(self) -> list[RawPiece]:
        return self.assistant or (["{content}"] if self.efficient_eos else ["{content}", {"eos": None}])


def load_formats() -> dict[str, Formats]:
    """Every named template's formats from the package data file."""
    raw = yaml.safe_load(DATA_FILE.read_text(encoding="utf-8"))
    names = {f.name for f in fields(Formats)}
    table = {}
    for name, entry in raw.items():
        unknown = set(entry) - names
        if unknown:
            raise ValueError(f"{DATA_FILE}: template '{name}' has unknown keys {sorted(unknown)}")
        for key in ("thought_words", "tool_call_words"):
            if key in entry:
                entry[key] = tuple(entry[key])
        table[name] = Formats(**entry)
    return table


class NamedTemplate(Template):
    """A template rendered from piece lists, turn by turn as LLaMA-Factory's Template._encode does."""

    def __init__(self, name: str, formats: Formats, tokenizer: Any, enable_thinking: bool = True,
                 default_system: str | None = None, tool_format: str | None = None) -> None:
        super().__init__(tokenizer)
        self.name = name
        self.formats = formats
        self.enable_thinking = enable_thinking
        self.default_system = formats.default_system if default_system is None else default_system
        self.efficient_eos = formats.efficient_eos
        self.tools: ToolFormat = get_tool_format(tool_format or formats.tool_format)
        # Like LLaMA-Factory's tool_format option: an explicit format also resets the call turn to content + eos.
        self.function = formats.function or formats.assistant_pieces()
        if tool_format:
            self.function = ["{content}"] if formats.efficient_eos else ["{content}", {"eos": None}]
        self.stop_words = list(dict.fromkeys([*formats.stop_words, self.eos_token]))

    def cache_key(self) -> str:
        return repr([self.name, self.formats, self.default_system, self.enable_thinking, self.tools.cache_key(),
                     self.function])

    @property
    def eos_token(self) -> str:
        """The eos the formats place: the first stop word with replace_eos, else the tokenizer's."""
        if self.formats.replace_eos:
            return self.formats.stop_words[0]
        if self.tokenizer is None:
            return "</s>"
        return self.tokenizer.eos_token or "<|endoftext|>"  # LLaMA-Factory adds <|endoftext|> when there is none

    @property
    def bos_token(self) -> str | None:
        return "<s>" if self.tokenizer is None else self.tokenizer.bos_token

    @property
    def efficient_eos_id(self) -> int | None:
        """The eos id appended once at a row's end when the template has efficient_eos, else None."""
        return self.token_id(self.eos_token) if self.efficient_eos else None

    def fill(self, pieces: list[RawPiece], content: str = "") -> Side:
        """Pieces with the content in place of {content} (once per piece) and bos/eos/tokens as Token pieces."""
        out: Side = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(piece.replace("{content}", content, 1))
            elif "bos" in piece:
                out += [Token(self.bos_token)] if self.bos_token else []
            elif "eos" in piece:
                out.append(Token(self.eos_token))
            else:
                out.append(Token(piece["token"]))
        return out

    def render_pieces(self, messages: list[Message], system: str | None, tools: str | None) -> list[PiecePair]:
        """Pieces of each (prompt, response) pair; reasoning templates add an empty thought where none is given."""
        f = self.formats
        if f.reasoning and not self.enable_thinking:
            messages = [self._without_thought(m) if i % 2 else m for i, m in enumerate(messages)]
        sides = self._turns(messages, system, tools)
        pairs = [(sides[i], sides[i + 1]) for i in range(0, len(sides) - 1, 2)]
        if f.reasoning:
            for k, (prompt, response) in enumerate(pairs):
                if not self._has_thought(messages[2 * k + 1].content):
                    # Not trained when thinking is off (the prompt ends with it), trained otherwise.
                    if self.enable_thinking:
                        response.insert(0, self.empty_thought())
                    else:
                        prompt.append(self.empty_thought())
        return pairs

    def prompt_pieces(self, messages: list[Message], system: str | None, tools: str | None) -> Side:
        """Pieces of a generation prompt; earlier answers lose their thoughts, as the families' templates do."""
        f = self.formats
        if f.reasoning:
            messages = [self._without_thought(m) if i % 2 else m for i, m in enumerate(messages)]
        sides = self._turns([*messages, Message("assistant", "")], system, tools)
        prompt = [piece for side in sides[:-1] for piece in side]
        if f.reasoning and not self.enable_thinking:
            prompt.append(self.empty_thought())
        return prompt

    def render_pairs(self, messages: list[Message], system: str | None, tools: str | None) -> list[Pair]:
        """(prompt, response) texts."""
        return [("".join(p), "".join(r)) for p, r in self.render_pieces(messages, system, tools)]

    def render_prompt(self, messages: list[Message], system: str | None, tools: str | None) -> str:
        """Full text up to where the model starts answering."""
        return "".join(self.prompt_pieces(messages, system, tools))

    def encode_prompt(self, messages: list[Message], system: str | None, tools: str | None) -> list[int]:
        """Token ids of a generation prompt, tokenized piece by piece exactly as training does."""
        if len(messages) % 2 != 1:
            raise TemplateError("a generation prompt needs an odd number of turns ending with a user turn")
        return self.encode_sides([self.prompt_pieces(messages, system, tools)])[0]

    def _turns(self, messages: list[Message], system: str | None, tools: str | None) -> list[Side]:
        """Pieces of each message; the prefix, system prompt and tool listing open the first one."""
        f = self.formats
        system = system or self.default_system
        turns = []
        for i, message in enumerate(messages):
            side: Side = []
            lead = ""
            if i == 0:
                side += self.fill(f.prefix)
                if system or tools:
                    content = system + (self.describe_tools(tools) if tools else "")
                    if f.kind == "llama2":  # the system text goes inside the first user turn
                        lead = self.fill(f.system, content)[0]
                    else:
                        side += self.fill(f.system, content)
            if message.role == "user":
                side += self.fill(f.user, lead + message.content)
            elif message.role == "assistant":
                side += self.fill(f.assistant_pieces(), message.content)
            elif message.role == "observation":
                side += self.fill(f.observation or f.user, message.content)
            elif message.role == "function":
                side += self.fill(self.function, self.function_text(message.content))
            else:
                raise TemplateError(f"unexpected role '{message.role}'")
            turns.append(side)
        return turns

    def describe_tools(self, tools: str) -> str:
        """The tool listing appended to the system prompt."""
        try:
            listed = json.loads(tools)
        except json.JSONDecodeError:
            raise TemplateError(f"tools must be a JSON list of function schemas, got {tools[:60]!r}") from None
        return self.tools.describe(listed) if listed else ""

    def function_text(self, content: str) -> str:
        """A function-call turn: any thought or text around the calls kept, the calls in the tool format."""
        f = self.formats
        if f.kind == "llama2":  # LLaMA-Factory's Llama2Template reads the whole turn as JSON
            return self.tools.write(parse_calls(content))
        block = _between(f.tool_call_words, content)
        if block:
            return content.replace(block.group(0), "") + self.tools.write(parse_calls(block.group(1)))
        thought = _between(f.thought_words, content)
        if thought:
            calls = parse_calls(content.replace(thought.group(0), ""))
            return thought.group(0) + self.tools.write(calls)
        return self.tools.write(parse_calls(content))

    def empty_thought(self) -> str:
        """The empty thinking block (GLM-4.7 writes only the closing tag)."""
        first, last = self.formats.thought_words
        return last if self.formats.kind == "glm47" else first + last

    def _has_thought(self, content: str) -> bool:
        first, last = self.formats.thought_words
        return first.strip() in content or last.strip() in content

    def _without_thought(self, message: Message) -> Message:
        first, last = self.formats.thought_words
        pattern = re.compile(f"{re.escape(first)}(.*?){re.escape(last)}", re.DOTALL)
        return Message(message.role, pattern.sub("", message.content).lstrip("\n"))

    def extract_tool_calls(self, text: str) -> list[Call] | None:
        """The tool calls in a generated answer, read with this template's tool format."""
        return self.tools.read(text)

    def describe(self) -> dict[str, Any]:
        """Formats and stop words (for `templates show`)."""
        return {"name": self.name, "stop_words": self.stop_words, "default_system": self.default_system,
                "tool_format": type(self.tools).__name__, "provenance": provenance(self.formats)}


def provenance(formats: Formats) -> str:
    """Where a template's formats come from and what checks them."""
    text = formats.provenance
    if formats.reference:
        text += f"; official Jinja ({formats.reference}) checked"
    return text


def _between(words: tuple[str, str], content: str) -> re.Match[str] | None:
    return re.search(f"{re.escape(words[0])}(.*?){re.escape(words[1])}", content, re.DOTALL)


def parse_calls(content: str) -> list[Call]:
    """A function-call turn's JSON ({"name", "arguments"}, a list of them, or OpenAI tool_calls) as calls."""
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
        if isinstance(args, str):  # OpenAI writes arguments as JSON text
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        out.append((call["name"], json.dumps(args, ensure_ascii=False)))
    return out
