"""The tokenizer's own Jinja chat template, with trained tokens found by prompt/full prefix diffs."""

from __future__ import annotations

import json
from typing import Any

from tuneforge.data.types import Message
from tuneforge.errors import TemplateError
from tuneforge.templates.base import Pair, Template


class AutoTemplate(Template):
    """Renders with `apply_chat_template`; refuses templates whose renderings are not prefix-stable."""

    name = "auto"

    def __init__(self, tokenizer: Any, default_system: str | None = None, enable_thinking: bool = True) -> None:
        super().__init__(tokenizer)
        if not tokenizer.chat_template:
            raise TemplateError("data.template is 'auto' but the tokenizer has no chat template; "
                                "choose a named template (tuneforge templates list), e.g. data.template=default")
        self.default_system = default_system
        self.enable_thinking = enable_thinking
        self.stop_words = [tokenizer.eos_token] if tokenizer.eos_token else []

    def cache_key(self) -> str:
        return repr([self.name, self.tokenizer.chat_template, self.default_system, self.enable_thinking])

    def render_pairs(self, messages: list[Message], system: str | None, tools: str | None) -> list[Pair]:
        """Slice the full rendering at each turn boundary; each slice must extend the previous rendering."""
        pairs = []
        done = ""
        for i in range(0, len(messages) - 1, 2):
            prompt = self._render(messages[: i + 1], system, tools, generation_prompt=True)
            full = self._render(messages[: i + 2], system, tools, generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise TemplateError(
                    f"the tokenizer's chat template is not prefix-stable at turn {i + 2}: rendering more turns "
                    "changes the text of earlier ones, so trained tokens cannot be located reliably. Use a named "
                    "template instead (data.template=..., see `tuneforge templates list`)"
                )
            pairs.append((prompt[len(done):], full[len(prompt):]))
            done = full
        return pairs

    def render_prompt(self, messages: list[Message], system: str | None, tools: str | None) -> str:
        """The tokenizer's rendering with the generation prompt."""
        return self._render(messages, system, tools, generation_prompt=True)

    def _render(self, messages: list[Message], system: str | None, tools: str | None, generation_prompt: bool) -> str:
        chat = []
        system = system if system is not None else self.default_system
        if system:
            chat.append({"role": "system", "content": system})
        chat += [_hf_message(m) for m in messages]
        try:
            return self.tokenizer.apply_chat_template(
                chat, tools=json.loads(tools) if tools else None, tokenize=False,
                add_generation_prompt=generation_prompt, enable_thinking=self.enable_thinking,
            )
        except Exception as err:  # Jinja raise_exception() and template errors carry the useful message
            raise TemplateError(f"the tokenizer's chat template failed: {err}. Use a named template instead "
                                "(data.template=..., see `tuneforge templates list`)") from None


def _hf_message(message: Message) -> dict[str, Any]:
    if message.role == "observation":
        return {"role": "tool", "content": message.content}
    if message.role == "function":
        calls = json.loads(message.content)
        calls = calls if isinstance(calls, list) else [calls]
        return {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": c.get("function", c)} for c in calls]}
    return {"role": message.role, "content": message.content}
