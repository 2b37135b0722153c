"""`tuneforge api`: serve a base model and its adapters with an OpenAI-compatible API; reward models (a value head
beside the weights, or stage=rm / --stage rm as in LLaMA-Factory) answer POST /v1/score/evaluation."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from tuneforge.chat.batching import BatchSettings
from tuneforge.errors import ConfigError

DEFAULT_TIME_LIMIT = 300.0  # as tuneforge.serve.api.DEFAULT_TIME_LIMIT (not imported: it pulls in FastAPI)
SHUTDOWN_GRACE = 2  # seconds open requests get after SIGTERM before they are cut


def register(sub: Any) -> None:
    """Add the api command."""
    from tuneforge.cli.main import add_config_argument

    p = sub.add_parser("api", help="OpenAI-compatible API server (binds 127.0.0.1:8000 by default)")
    add_config_argument(p)
    p.add_argument("--host", default=None, help="address to bind (default API_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default API_PORT or 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default API_KEY)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve an adapter under its own model name (repeatable)")
    p.add_argument("--batch-size", type=int, default=BatchSettings.max_sequences, metavar="N",
                   help="greedy requests decoded together by continuous batching (default %(default)s; 1 runs one "
                        "generation at a time)")
    p.add_argument("--kv-cache-tokens", type=int, default=BatchSettings.cache_tokens, metavar="T",
                   help="tokens the shared KV cache of the batch holds, all requests together (default "
                        "%(default)s)")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT, metavar="S",
                   help="seconds one answer may take before it is cut, finish reason 'length' (default %(default)g)")
    p.set_defaults(handler=cmd_api)


def adapter_names(paths: list[str], flags: list[str]) -> dict[str, str]:
    """Model name -> adapter path: run-folder names for model.adapter_path, NAME=PATH for --adapter."""
    named: dict[str, str] = {}
    for path in paths:
        folder = Path(path)
        named[folder.parent.name if folder.name == "adapter" else folder.name] = path
    for item in flags:
        if "=" not in item:
            raise ConfigError(f"--adapter {item!r} must look like NAME=PATH")
        name, path = item.split("=", 1)
        named[name] = path
    return named


def reward_models(engine: Any, base_name: str, required: bool) -> list[str]:
    """Names of the served models that have a value head; stage rm without any is one clear error."""
    served = {base_name: False, **{name: name for name in engine.adapters}}
    found = [name for name, adapter in served.items() if engine.is_reward_model(adapter)]
    if required and not found:
        raise ConfigError("stage rm serves reward models, but none of the served weights has a value head "
                          "(value_head.safetensors beside the adapter or in the model folder); give the run of a "
                          "stage rm training in model.adapter_path (adapter_name_or_path)")
    return found


def cmd_api(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Load the model once and serve it until interrupted."""
    import uvicorn

    from tuneforge.chat.engine import load_engine
    from tuneforge.config import load
    from tuneforge.config.paths import check_paths
    from tuneforge.deps import require
    from tuneforge.serve.api import create_app

    require("fastapi", "api")
    cfg = load(args.config, overrides, flags)
    check_paths(cfg)
    named = adapter_names(cfg.model.adapter_path, args.adapter)
    if args.time_limit <= 0:
        raise ConfigError(f"--time-limit must be > 0 seconds, got {args.time_limit:g}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: give 1 (one generation at a time) or more")
    batching = BatchSettings(max_sequences=args.batch_size, cache_tokens=args.kv_cache_tokens) \
        if args.batch_size > 1 else None  # checked before the model loads
    engine = load_engine(replace(cfg.model, adapter_path=[]), cfg.data.template, cfg.data.default_system,
                         cfg.data.enable_thinking, named=named, tool_format=cfg.data.tool_format)
    base_name = Path(cfg.model.path).name if Path(cfg.model.path).exists() else cfg.model.path
    rewards = reward_models(engine, base_name, cfg.stage == "rm")
    app = create_app(engine, base_name, args.api_key or os.environ.get("API_KEY") or None, cfg.generation,
                     reward=cfg.stage == "rm", time_limit=args.time_limit)
    host = args.host or os.environ.get("API_HOST", "127.0.0.1")
    port = args.port or int(os.environ.get("API_PORT", "8000"))
    print(f"serving {', '.join([base_name, *engine.adapters])} on http://{host}:{port}/v1", flush=True)
    if rewards:
        print(f"reward models (POST /v1/score/evaluation): {', '.join(rewards)}", flush=True)
    if batching is not None:
        engine.start_batching(batching)
    try:
        # SIGTERM / Ctrl-C: open requests get SHUTDOWN_GRACE seconds, then are cut; generations end with them
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE)
    finally:
        engine.shutdown()
    return 0
