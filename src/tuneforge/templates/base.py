"""The Template interface: render a conversation into (prompt, response) text pairs, then token ids."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from tuneforge.data.types import Message
from tuneforge.errors import TemplateError

Pair = tuple[str, str]


class Template(ABC):
    """A chat format bound to a tokenizer. Prompts are masked in training; responses are trained."""

    name: str
    stop_words: list[str]

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @abstractmethod
    def render_pairs(self, messages: list[Message], system: str | None, tools: str | None) -> list[Pair]:
        """Text of each (prompt, response) turn pair; `messages` alternates prompt/response and ends with one."""

    @abstractmethod
    def render_prompt(self, messages: list[Message], system: str | None, tools: str | None) -> str:
        """Full text up to where the model starts answering; `messages` ends with a prompt turn."""

    def render_history(self, messages: list[Message], system: str | None, tools: str | None) -> list[Pair]:
        """Pairs of earlier turns as rendered before a new prompt; the same as render_pairs for most templates."""
        return self.render_pairs(messages, system, tools)

    def encode_pairs(self, messages: list[Message], system: str | None, tools: str | None) -> list[tuple[list[int],
                                                                                                        list[int]]]:
        """Token ids of each (prompt, response) pair, tokenized piece by piece like generation does."""
        return [(self.tokenize(p), self.tokenize(r)) for p, r in self.render_pairs(messages, system, tools)]

    def encode_prompt(self, messages: list[Message], system: str | None, tools: str | None) -> list[int]:
        """Token ids of a generation prompt, split the same way as in training so ids match exactly."""
        if len(messages) % 2 != 1:
            raise TemplateError("a generation prompt needs an odd number of turns ending with a user turn")
        history = self.render_history(messages[:-1], system, tools) if len(messages) > 1 else []
        ids = [t for p, r in history for t in self.tokenize(p) + self.tokenize(r)]
        history_text = "".join(p + r for p, r in history)
        full = self.render_prompt(messages, system, tools)
        if not full.startswith(history_text):
            raise TemplateError(f"template '{self.name}' renders the history differently once a new turn is added")
        return ids + self.tokenize(full[len(history_text):])

    def tokenize(self, text: str) -> list[int]:
        """Ids of a text piece without the tokenizer's automatic special tokens (templates place them)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def describe(self) -> dict[str, Any]:
        """Summary for `templates show` and the run manifest."""
        return {"name": self.name, "stop_words": self.stop_words}
