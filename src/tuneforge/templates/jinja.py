"""The chat template (Jinja) saved with adapters and exports, so that a plain `apply_chat_template` renders what
training rendered: the training template's turns and its default system prompt.

Named templates of kind plain and llama2 are written out piece by piece (LLaMA-Factory's formats: text with a
{content} slot, bos, eos, named tokens); system, user, assistant and tool-result turns are rendered, and the
generation prompt is what the user format already ends with, as in LLaMA-Factory's own Jinja conversion.
Reasoning templates and templates taken from the tokenizer keep the tokenizer's Jinja (it handles thinking), with
the training default system prompt put in front when a conversation brings none.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tuneforge.templates.base import Template


def training_chat_template(template: Template) -> str | None:
    """The Jinja template to save beside trained weights, or None to keep the tokenizer's own unchanged."""
    from tuneforge.templates.named import NamedTemplate

    if isinstance(template, NamedTemplate) and template.formats.kind in ("plain", "llama2"):
        return _named(template)
    own = getattr(template.tokenizer, "chat_template", None)
    system = getattr(template, "default_system", None)
    if not isinstance(own, str) or not system:
        return own if isinstance(own, str) else None
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': {_quote(system)}}}] + messages -%}}"
            "{%- endif -%}\n" + own)


def _quote(text: str) -> str:
    """A Jinja string literal (JSON's escaping is valid Jinja)."""
    return json.dumps(text, ensure_ascii=False)


def _expr(template: Any, pieces: list[Any], content: str) -> str:
    """A Jinja expression for a format: literal text joined with `content` (itself an expression) in its slot."""
    parts = []
    for piece in pieces:
        if isinstance(piece, str):
            before, slot, after = piece.partition("{content}")
            parts += [_quote(before)] if before else []
            parts += [f"({content})"] if slot else []
            parts += [_quote(after)] if slot and after else []
        elif "bos" in piece:
            parts += [_quote(template.bos_token)] if template.bos_token else []
        elif "eos" in piece:
            parts.append(_quote(template.eos_token))
        else:
            parts.append(_quote(piece["token"]))
    return " ~ ".join(parts) or "''"


def _named(template: Any) -> str:
    f = template.formats
    content = "message['content']"
    lines = [
        f"{{%- set system_message = {_quote(template.default_system or '')} -%}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system_message = messages[0]['content'] -%}",
        "{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}",
        f"{{{{ {_expr(template, f.prefix, '')} }}}}" if f.prefix else "",
    ]
    system = _expr(template, f.system, "system_message")
    if f.kind == "llama2":  # the system text goes inside the first user turn
        user = _expr(template, f.user, f"(({system}) if loop.first and system_message else '') ~ {content}")
    else:
        lines.append(f"{{%- if system_message -%}}{{{{ {system} }}}}{{%- endif -%}}")
        user = _expr(template, f.user, content)
    lines += [
        "{%- for message in loop_messages -%}",
        f"{{%- if message['role'] == 'user' -%}}{{{{ {user} }}}}",
        f"{{%- elif message['role'] == 'assistant' -%}}{{{{ {_expr(template, f.assistant_pieces(), content)} }}}}",
        f"{{%- elif message['role'] in ('tool', 'observation') -%}}"
        f"{{{{ {_expr(template, f.observation or f.user, content)} }}}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    return "\n".join(line for line in lines if line)


@contextmanager
def training_template_on(tokenizer: Any, template: Template) -> Iterator[str | None]:
    """The tokenizer carries the training chat template while saving (restored after: rendering during training
    may use the tokenizer's own)."""
    own = getattr(tokenizer, "chat_template", None)
    jinja = training_chat_template(template)
    tokenizer.chat_template = jinja if jinja is not None else own
    try:
        yield tokenizer.chat_template
    finally:
        tokenizer.chat_template = own
