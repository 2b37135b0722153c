"""The Template interface: render a conversation into (prompt, response) text pairs, then token ids."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from tuneforge.data.types import Message
from tuneforge.errors import TemplateError

Pair = tuple[str, str]


class Token(str):
    """A piece that is one token by name (bos, eos, a literal special token): looked up, never tokenized."""


# A side (the prompt or the response of a turn) is a list of pieces. Text pieces are tokenized one by one, as
# LLaMA-Factory tokenizes each slot element on its own: "a\n\n" + "###" and "a\n\n###" can give different ids.
Side = list[str]
PiecePair = tuple[Side, Side]


class Template(ABC):
    """A chat format bound to a tokenizer. Prompts are masked in training; responses are trained."""

    name: str
    stop_words: list[str]
    efficient_eos: bool = False  # eos only at the row's end, trained through the next prompt's first label

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

    def render_pieces(self, messages: list[Message], system: str | None, tools: str | None) -> list[PiecePair]:
        """The pieces of each (prompt, response) pair; by default each rendered text is one piece."""
        return [([p], [r]) for p, r in self.render_pairs(messages, system, tools)]

    def encode_pairs(self, messages: list[Message], system: str | None, tools: str | None) -> list[tuple[list[int],
                                                                                                        list[int]]]:
        """Token ids of each (prompt, response) pair, tokenized piece by piece like generation does."""
        sides = self.encode_sides([side for pair in self.render_pieces(messages, system, tools) for side in pair])
        return [(sides[i], sides[i + 1]) for i in range(0, len(sides), 2)]

    def encode_sides(self, sides: list[Side]) -> list[list[int]]:
        """Ids of each side: its text pieces tokenized separately (all in one batched call), Token pieces by id."""
        texts = [p for side in sides for p in side if p and not isinstance(p, Token)]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        out = []
        for side in sides:
            ids: list[int] = []
            for piece in side:
                if isinstance(piece, Token):
                    ids.append(self.token_id(piece))
                elif piece:
                    ids += next(encoded)
            out.append(ids)
        return out

    def token_id(self, token: str) -> int:
        """The id of a token the template places by name; refuses one the tokenizer does not have."""
        found = self.tokenizer.convert_tokens_to_ids(token)
        if found is None or (found == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise TemplateError(f"template '{self.name}' places the token {token!r} but the tokenizer has no such "
                                f"token; add it with model.add_special_tokens=['{token}'] or pick the template of "
                                "this model's family")
        return int(found)

    @property
    def efficient_eos_id(self) -> int | None:
        """The eos id appended once at a row's end when the template has efficient_eos, else None."""
        return None

    def extract_tool_calls(self, text: str) -> list[tuple[str, str]] | None:
        """The (name, JSON arguments) tool calls in a generated answer, or None when it calls no tool."""
        from tuneforge.templates.tools import read_hermes_or_json

        return read_hermes_or_json(text)

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

    def cache_key(self) -> str:
        """Everything the rendered text depends on besides the conversation (keys the tokenized-data cache)."""
        return repr([self.name, self.tokenizer.chat_template])

    def describe(self) -> dict[str, Any]:
        """Summary for `templates show` and the run manifest."""
        return {"name": self.name, "stop_words": self.stop_words}
