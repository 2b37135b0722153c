"""`tuneforge expand`: LLaMA-Pro block expansion (LLaMA-Factory's scripts/llama_pro.py), then how to train it."""

from __future__ import annotations

import argparse
from typing import Any

from tuneforge.errors import ConfigError

USAGE = ("tuneforge expand --model_name_or_path MODEL --output_dir DIR --num_expand N [--trust_remote_code true]\n"
         "  --model_name_or_path (or --model): model folder, hub id or alias to expand\n"
         "  --output_dir: empty folder for the expanded model\n"
         "  --num_expand: blocks to add; must divide the number of layers (one after every layers / N)")


def register(sub: Any) -> None:
    """Add the expand command. Its --flags go through the LLaMA-Factory flag path (so they stay unknown to the
    other commands' parsers, where --output_dir etc. are LF keys)."""
    p = sub.add_parser("expand", help="add zero-initialised decoder blocks to a model (LLaMA-Pro)", usage=USAGE)
    p.set_defaults(handler=cmd_expand, accepts_overrides=True)


def cmd_expand(args: argparse.Namespace, overrides: list[str], flags: dict[str, Any]) -> int:
    """Expand and save, then print the settings that train only the new blocks."""
    from tuneforge.finetune.llama_pro import expand_model

    unknown = set(flags) - {"model_name_or_path", "model", "output_dir", "num_expand", "trust_remote_code"}
    if overrides or unknown:
        raise ConfigError(f"expand: unexpected {', '.join(overrides or sorted(unknown))}; usage: {USAGE}")
    model, out, count = flags.get("model_name_or_path") or flags.get("model"), flags.get("output_dir"), \
        flags.get("num_expand")
    if not (model and out and count):
        raise ConfigError(f"expand needs --model_name_or_path, --output_dir and --num_expand; usage: {USAGE}")
    if not str(count).isdigit():
        raise ConfigError(f"--num_expand must be a whole number, got {count!r}")
    trust = str(flags.get("trust_remote_code", "false")).lower() in {"true", "1", "yes"}
    saved = expand_model(str(model), out, int(count), trust)
    print(f"expanded model saved to {saved}\ntrain only the new blocks with:\n"
          f"  model.path={saved} finetune.method=freeze finetune.freeze.trainable_layers={count} "
          "finetune.llama_pro=true\n"
          f"  (LLaMA-Factory: finetuning_type: freeze, freeze_trainable_layers: {count}, use_llama_pro: true)")
    return 0
