"""`tuneforge webui [--root DIR] [--host H] [--port P] [--share] [--auth USER:PASSWORD] [--lang en|zh]`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    """Add the webui command."""
    p = sub.add_parser("webui", help="the web UI: train, evaluate, chat and export by clicking (zh/en)")
    p.add_argument("--root", default=".", help="working folder; the UI reads and writes only its data/, runs/, "
                   "configs/, exports/ and models/ (default: the current folder)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to bind (default 127.0.0.1, or GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860, or GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="also open a public gradio share link")
    p.add_argument("--auth", default=os.environ.get("TUNEFORGE_WEBUI_AUTH"), metavar="USER:PASSWORD",
                   help="require this login (or TUNEFORGE_WEBUI_AUTH); advised with --share or a non-local --host")
    p.add_argument("--lang", choices=["en", "zh"], default="en", help="starting language (switchable in the page)")
    p.set_defaults(handler=cmd_webui)


def cmd_webui(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Serve the board until interrupted."""
    from tuneforge.deps import require

    require("gradio", "webui")
    from tuneforge.webui.app import serve

    serve(Path(args.root), args.host, args.port or port_from_env(), args.share, args.lang, parse_auth(args.auth))
    return 0


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """USER:PASSWORD as gradio's auth pair."""
    from tuneforge.errors import ConfigError

    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth takes USER:PASSWORD (both non-empty)")
    return user, password


def port_from_env() -> int:
    """GRADIO_SERVER_PORT, or 7860."""
    from tuneforge.errors import ConfigError

    value = os.environ.get("GRADIO_SERVER_PORT", "7860")
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ConfigError(f"GRADIO_SERVER_PORT={value!r} is not a port number (1-65535)")
    return int(value)
