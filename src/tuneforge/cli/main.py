"""`tuneforge` command line: parses arguments and hands over to the commands; no training logic here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from tuneforge.errors import TuneforgeError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tuneforge` console script; user errors print one message and exit 2."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    kept, lf_tokens = separate_unknown_flags(argv, known_options(parser))
    args, rest = parser.parse_known_args(kept)
    rest += lf_tokens
    config = getattr(args, "config", None)
    if config and "=" in config and not os.path.exists(config):  # an override, not a file
        rest.insert(0, config)
        args.config = None
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from tuneforge.logs import quiet_libraries

    quiet_libraries(args.verbose)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        if rest and not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        overrides, flags = split_extra(rest)
        args.argv = argv[argv.index(args.command) + 1:] if getattr(args, "command", None) in argv else argv
        return int(args.handler(args, overrides, flags) or 0)
    except TuneforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def known_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of the parser and its subcommands."""
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found |= known_options(child)
    return found


def separate_unknown_flags(argv: list[str], known: set[str]) -> tuple[list[str], list[str]]:
    """Pull `--lf_key value` pairs out before argparse, so a flag's value is never taken as CONFIG."""
    kept: list[str] = []
    extra: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and token.split("=", 1)[0] not in known:
            extra.append(token)
            if "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                extra.append(argv[i + 1])
                i += 1
        else:
            kept.append(token)
        i += 1
    return kept, extra


def split_extra(rest: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Separate `key=value` overrides from LLaMA-Factory style `--key value` / `--key=value` flags."""
    overrides: list[str] = []
    flags: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("--"):
            key = token[2:]
            if "=" in key:
                key, value = key.split("=", 1)
                flags[key] = value
            elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                flags[key] = rest[i + 1]
                i += 1
            else:
                flags[key] = "true"
        elif "=" in token:
            overrides.append(token)
        else:
            raise TuneforgeError(f"unexpected argument '{token}': use key=value overrides or --key value flags")
        i += 1
    return overrides, flags


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    from tuneforge.cli import (
        api_cmd,
        chat_cmd,
        data_cmds,
        eval_cmd,
        expand_cmd,
        export_cmd,
        info_cmds,
        train_cmd,
        webui_cmd,
    )

    parser = argparse.ArgumentParser(
        prog="tuneforge", description="Fine-tune large language models end to end.",
        epilog="Configs take dotted overrides (train.learning_rate=2e-4) and LLaMA-Factory flags (--learning_rate 2e-4).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    info_cmds.register(sub)
    data_cmds.register(sub)
    train_cmd.register(sub)
    chat_cmd.register(sub)
    api_cmd.register(sub)
    export_cmd.register(sub)
    expand_cmd.register(sub)
    eval_cmd.register(sub)
    webui_cmd.register(sub)
    return parser


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """CONFIG positional (optional when LLaMA-Factory flags give everything); extra args are overrides."""
    parser.add_argument("config", nargs="?", help="YAML config (ours or LLaMA-Factory's flat dialect)")
    parser.set_defaults(accepts_overrides=True)


if __name__ == "__main__":
    raise SystemExit(main())
