"""The Chat tab's model: one engine (base + adapters) loaded at a time, answers streamed, base beside tuned."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneforge.config import load_tree
from tuneforge.config.schema import GenerationConfig
from tuneforge.data.types import Message
from tuneforge.webui.workspace import Workspace

History = list[dict[str, str]]  # gradio's messages format: {"role": ..., "content": ...}


class ChatSession:
    """The loaded engine shared by the page (one model in memory, one generation at a time)."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.description: dict[str, str] = {}  # model, adapters, template of what is loaded
        self._lock = threading.Lock()

    def load(self, values: dict[str, Any], ws: Workspace) -> dict[str, str]:
        """Load the top bar's model, adapters and template; returns what was loaded (model, adapters, template)."""
        from tuneforge.chat.engine import load_engine
        from tuneforge.webui.actions import top_tree

        cfg = load_tree(top_tree(values, ws), "web UI chat tab")
        with self._lock:
            self.engine = None  # free the old weights before loading new ones
            self.engine = load_engine(cfg.model, cfg.data.template)
            adapters = ", ".join(self.engine.adapters) or "-"
            self.description = {"model": ws.relative(Path(cfg.model.path)), "adapters": adapters, "template": self.engine.template.name}
        return self.description

    def unload(self) -> None:
        """Drop the model from memory."""
        with self._lock:
            self.engine, self.description = None, {}

    def stream(self, history: History, gen: GenerationConfig, adapter: bool) -> Iterator[str]:
        """The growing answer to the conversation so far (its last message is the user's)."""
        from tuneforge.errors import ModelError

        engine = self.engine
        if engine is None:
            raise ModelError("load a model first (Chat tab: Load model)")
        messages = [Message(m["role"], _text(m["content"])) for m in history if m["role"] in ("user", "assistant")]
        answer = ""
        for piece in engine.stream(messages, gen, adapter=adapter):
            answer += piece
            yield answer


def generation(system: str | None, temperature: float, top_p: float, max_new_tokens: int) -> GenerationConfig:
    """Decoding settings from the Chat tab's controls."""
    return GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                            system=(system or None))


def respond(session: ChatSession, message: str, tuned: History, base: History, gen: GenerationConfig,
            compare: bool) -> Iterator[tuple[History, History]]:
    """Stream the tuned answer (and, in compare mode, then the base answer) into the two histories."""
    tuned = [*tuned, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    base = [*base, {"role": "user", "content": message}, {"role": "assistant", "content": ""}] if compare else base
    for text in session.stream(tuned[:-1], gen, adapter=True):
        tuned[-1] = {"role": "assistant", "content": text}
        yield tuned, base
    if compare:
        from tuneforge.chat.engine import BASE

        for text in session.stream(base[:-1], gen, adapter=BASE):
            base[-1] = {"role": "assistant", "content": text}
            yield tuned, base
    yield tuned, base


def _text(content: Any) -> str:
    # gradio may hand back content as a list of parts ({"type": "text", "text": ...}); keep the text.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)
