"""`tuneforge chat`: interactive terminal chat, or one answer per piped line; --compare shows base vs tuned."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tuneforge.errors import ConfigError


def register(sub: Any) -> None:
    """Add the chat command."""
    from tuneforge.cli.main import add_config_argument

    p = sub.add_parser("chat", help="chat with a model (+ adapters) in the terminal; piped stdin: one prompt per line")
    add_config_argument(p)
    p.add_argument("--compare", action="store_true", help="answer with the base model and the tuned model")
    p.set_defaults(handler=cmd_chat)


def cmd_chat(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Load the engine once, then chat interactively or answer piped prompts."""
    from tuneforge.chat.engine import load_engine
    from tuneforge.config import load
    from tuneforge.config.paths import check_paths

    cfg = load(args.config, overrides, flags)
    check_paths(cfg)
    engine = load_engine(cfg.model, cfg.data.template, cfg.data.default_system, cfg.data.enable_thinking)
    if args.compare and not engine.has_adapter:
        raise ConfigError("--compare needs an adapter (model.adapter_path, LLaMA-Factory: adapter_name_or_path)")
    if sys.stdin.isatty():
        return interactive(engine, cfg.generation, args.compare)
    return piped(engine, cfg.generation, args.compare)


def piped(engine: Any, gen: Any, compare: bool) -> int:
    """Each non-empty input line is a new single-turn conversation; answers go to stdout, one block per prompt."""
    from tuneforge.data.types import Message

    for line in sys.stdin:
        prompt = line.strip()
        if not prompt:
            continue
        messages = [Message("user", prompt)]
        if compare:
            print(f"[prompt] {prompt}")
            print(f"[base]   {engine.generate(messages, gen, adapter=False)}")
            print(f"[tuned]  {engine.generate(messages, gen)}", flush=True)
        else:
            print(engine.generate(messages, gen), flush=True)
    return 0


def interactive(engine: Any, gen: Any, compare: bool) -> int:
    """A multi-turn chat with streamed answers; `clear` resets the history, `exit` quits."""
    from tuneforge.data.types import Message

    print("chat: type a message; 'clear' resets the history, 'exit' quits", file=sys.stderr)
    history: list[Message] = []
    while True:
        try:
            prompt = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if prompt == "exit":
            return 0
        if prompt == "clear":
            history = []
            print("history cleared", file=sys.stderr)
            continue
        if not prompt:
            continue
        history.append(Message("user", prompt))
        if compare:
            print("Base: ", end="", flush=True)
            for piece in engine.stream(history, gen, adapter=False):
                print(piece, end="", flush=True)
            print()
        print("Assistant: " if not compare else "Tuned: ", end="", flush=True)
        answer = ""
        for piece in engine.stream(history, gen):
            answer += piece
            print(piece, end="", flush=True)
        print()
        history.append(Message("assistant", answer.strip()))
