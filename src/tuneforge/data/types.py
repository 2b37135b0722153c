"""Canonical row types every dataset format converts into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["user", "assistant", "observation", "function"]
# user/observation turns are prompts; assistant/function (a tool call) turns are trained responses.
PROMPT_ROLES = ("user", "observation")
RESPONSE_ROLES = ("assistant", "function")


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass
class Conversation:
    """Alternating prompt/response messages (ending with a response for training), plus system and tools."""

    messages: list[Message]
    system: str | None = None
    tools: str | None = None
    origin: str = ""


@dataclass
class PreferencePair:
    """A prompt (ending with a user turn) with a chosen and a rejected response."""

    prompt: list[Message]
    chosen: Message
    rejected: Message
    system: str | None = None
    tools: str | None = None
    origin: str = ""


@dataclass
class KTOExample:
    """A conversation whose final response is labelled desirable (True) or undesirable (False)."""

    messages: list[Message]
    label: bool
    system: str | None = None
    tools: str | None = None
    origin: str = ""


@dataclass
class PromptExample:
    """A generation prompt (online RL): messages ending with a user turn, the dataset's final answer if it has one,
    and every other column of the row, all of which reach the reward functions."""

    messages: list[Message]
    answer: str | None = None
    columns: dict = field(default_factory=dict)
    system: str | None = None
    tools: str | None = None
    origin: str = ""


@dataclass
class Text:
    """Plain text for pre-training."""

    text: str
    origin: str = ""


Example = Conversation | PreferencePair | KTOExample | PromptExample | Text


@dataclass
class RowProblem:
    """One finding of the data doctor or the encoder about one row."""

    origin: str
    message: str
    severity: Literal["error", "warning"] = "error"
    kind: str = "schema"


@dataclass
class EncodeReport:
    """Counts and row ids of what encoding did beyond the plain path."""

    rows: int = 0
    truncated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    no_trained_tokens: list[str] = field(default_factory=list)
    trained_tokens: int = 0
    total_tokens: int = 0
