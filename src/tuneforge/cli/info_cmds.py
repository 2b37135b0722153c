"""`version`, `env`, `config show`, `templates list|show`."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
from typing import Any

from rich.console import Console
from rich.table import Table

from tuneforge import __version__
from tuneforge.devices import cpu_bf16_supported

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers", "gguf",
            "bitsandbytes", "gradio", "fastapi", "deepspeed", "modelscope")


def register(sub: Any) -> None:
    """Add the information commands to the parser."""
    from tuneforge.cli.main import add_config_argument

    p = sub.add_parser("version", help="print the tuneforge version")
    p.set_defaults(handler=lambda *_: print(__version__))
    p = sub.add_parser("env", help="versions, devices and bf16 support (paste this into bug reports)")
    p.set_defaults(handler=cmd_env)
    config = sub.add_parser("config", help="config tools").add_subparsers(metavar="ACTION")
    p = config.add_parser("show", help="print the resolved config in tuneforge's own dialect")
    add_config_argument(p)
    p.set_defaults(handler=cmd_config_show)
    templates = sub.add_parser("templates", help="chat templates").add_subparsers(metavar="ACTION")
    p = templates.add_parser("list", help="list template names")
    p.set_defaults(handler=cmd_templates_list)
    p = templates.add_parser("show", help="render a sample conversation with a template, trained text marked")
    p.add_argument("name")
    p.add_argument("--model", help="model whose tokenizer supplies bos/eos (required for 'auto')")
    p.set_defaults(handler=cmd_templates_show)


def cmd_env(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Print versions and device facts."""
    import torch

    table = Table(show_header=False)
    table.add_row("tuneforge", __version__)
    table.add_row("python", platform.python_version())
    table.add_row("platform", platform.platform())
    for name in PACKAGES:
        try:
            table.add_row(name, importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            table.add_row(name, "not installed")
    table.add_row("cpu threads", str(torch.get_num_threads()))
    table.add_row("cpu bf16", "yes" if cpu_bf16_supported() else "no (emulated, slow)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            table.add_row(f"cuda:{i}", torch.cuda.get_device_name(i))
        table.add_row("cuda bf16", "yes" if torch.cuda.is_bf16_supported() else "no")
    else:
        table.add_row("cuda", "not available")
    Console().print(table)
    return 0


def cmd_config_show(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Print the resolved config as YAML."""
    from tuneforge.config import dump, load

    print(dump(load(args.config, overrides, flags)), end="")
    return 0


def cmd_templates_list(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Print every template name with its stop words, tool format and provenance."""
    from tuneforge.templates import named_templates, provenance

    table = Table("name", "stop words", "tools", "default system", "provenance")
    table.add_row("auto", "the tokenizer's eos", "its own", "the tokenizer's template decides", "official Jinja")
    registry = named_templates()
    for name in registry.names():
        formats = registry.get(name)
        table.add_row(name, ", ".join(formats.stop_words) or "eos", formats.tool_format, formats.default_system[:50],
                      provenance(formats))
    Console().print(table)
    return 0


def cmd_templates_show(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Render a two-turn sample conversation, marking the text a model is trained on."""
    from tuneforge.cli.render import print_pairs
    from tuneforge.config.schema import ModelConfig
    from tuneforge.data.types import Message
    from tuneforge.errors import TemplateError
    from tuneforge.models.load import load_tokenizer
    from tuneforge.templates import get_template

    if args.name == "auto" and not args.model:
        raise TemplateError("'auto' renders with a model's own template: add --model PATH_OR_ALIAS")
    tokenizer = load_tokenizer(ModelConfig(path=args.model)) if args.model else None
    template = get_template(args.name, tokenizer)
    sample = [Message("user", "Hello, who are you?"), Message("assistant", "I am an AI assistant."),
              Message("user", "What is 2 + 2?"), Message("assistant", "2 + 2 = 4.")]
    print_pairs(template.render_pairs(sample, "You are a helpful assistant.", None))
    print(f"stop words: {', '.join(template.stop_words) or '(none)'}")
    return 0
