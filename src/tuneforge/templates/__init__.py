"""Chat templates: the tokenizer's own ('auto') or a named declarative one."""

from __future__ import annotations

import functools
from typing import Any

from tuneforge.errors import TemplateError
from tuneforge.registry import Registry
from tuneforge.templates.auto import AutoTemplate
from tuneforge.templates.base import Template
from tuneforge.templates.named import Formats, NamedTemplate, load_formats, provenance
from tuneforge.templates.tools import TOOL_FORMATS, get_tool_format, tool_format_names


@functools.cache
def named_templates() -> Registry[Formats]:
    """Registry of the named templates' formats (read once from named.yaml)."""
    registry: Registry[Formats] = Registry("template", TemplateError)
    for name, formats in load_formats().items():
        registry.add(name, formats)
    return registry


def template_names() -> list[str]:
    """'auto' plus every named template."""
    return ["auto", *named_templates().names()]


def get_template(name: str, tokenizer: Any, default_system: str | None = None,
                 enable_thinking: bool = True, tool_format: str | None = None) -> Template:
    """A template bound to `tokenizer`; 'auto' uses the tokenizer's own chat template. `tool_format` replaces a
    named template's tool syntax (LLaMA-Factory's tool_format option)."""
    if name == "auto":
        if tool_format:
            raise TemplateError("data.tool_format needs a named template (data.template=qwen, llama3, ...); "
                                "'auto' writes tools and calls with the tokenizer's own chat template")
        return AutoTemplate(tokenizer, default_system=default_system, enable_thinking=enable_thinking)
    formats = named_templates().get(name)
    return NamedTemplate(name, formats, tokenizer, enable_thinking=enable_thinking, default_system=default_system,
                         tool_format=tool_format)


__all__ = ["Template", "get_template", "template_names", "named_templates", "NamedTemplate", "AutoTemplate",
           "provenance", "TOOL_FORMATS", "get_tool_format", "tool_format_names"]
