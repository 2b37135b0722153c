"""Read a YAML config (ours or LLaMA-Factory's flat dialect), apply overrides, build the typed RunConfig."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import yaml

from tuneforge.config import llamafactory as lf
from tuneforge.config.rules import validate
from tuneforge.config.schema import RunConfig
from tuneforge.config.typed import build, coerce, field_type, to_dict
from tuneforge.errors import ConfigError, did_you_mean

log = logging.getLogger(__name__)
SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))


def load(path: str | Path | None, overrides: list[str] = (), lf_flags: dict[str, Any] | None = None) -> RunConfig:
    """Resolve a config file plus `key=value` overrides and `--lf_key value` flags into a validated RunConfig."""
    source = str(path) if path else "<overrides>"
    raw = read_yaml(Path(path)) if path else {}  # its messages already name the file
    return load_tree(raw, source, overrides, lf_flags)


def load_tree(raw: dict[str, Any], source: str, overrides: list[str] = (),
              lf_flags: dict[str, Any] | None = None) -> RunConfig:
    """Build a validated RunConfig from an already parsed mapping (a YAML file's content, or the web UI's form)."""
    tree: dict[str, Any] = {}
    try:
        _merge_top(tree, raw, source)
        for key, value in lf.precedence_order((lf_flags or {}).items()):
            _assign_lf(tree, key, value)
        for item in overrides:
            apply_override(tree, item)
        cfg = build(RunConfig, tree, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    validate(cfg, source)
    return cfg


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse a YAML mapping, turning a missing file or a syntax error into one clear message."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _merge_top(tree: dict[str, Any], raw: dict[str, Any], source: str) -> None:
    for key, value in lf.precedence_order(raw.items()):
        if key in SECTIONS and key != "stage" and not isinstance(value, dict) and lf.is_lf_key(key):
            _assign_lf(tree, key, value)  # LLaMA-Factory's flat `reward_model: path` (our section's name)
        elif key in SECTIONS:
            if key != "stage" and not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (a mapping), got {value!r}")
            if key == "stage":
                tree["stage"] = value
            else:
                _deep_merge(tree.setdefault(key, {}), value)
        elif lf.is_lf_key(key):
            _assign_lf(tree, key, value)
        else:
            known = list(SECTIONS) + list(lf.MAPPING)
            raise ConfigError(f"unknown key '{key}'.{did_you_mean(str(key), known)} "
                              f"Top-level keys are {', '.join(SECTIONS)}, or LLaMA-Factory flat keys")


def _assign_lf(tree: dict[str, Any], key: str, value: Any) -> None:
    if key in SECTIONS and key != "stage" and (isinstance(value, dict) or not lf.is_lf_key(key)):
        raise ConfigError(f"'{key}' is a section, not a value; set one of its keys, e.g. {key}.KEY=value")
    if not lf.is_lf_key(key):
        known = list(lf.MAPPING) + list(SECTIONS)
        raise ConfigError(f"unknown key '{key}'.{did_you_mean(key, known)}")
    try:
        assignments, notice = lf.map_key(key, value)
    except ConfigError as err:
        raise ConfigError(str(err)) from None
    if notice:
        log.warning(notice)
    for dotted, val in assignments:
        _set_checked(tree, dotted, val, label=key)


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply one `dotted.key=value` (our dialect) or `lf_key=value` (LLaMA-Factory) override."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. train.learning_rate=2e-4")
    key, text = item.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if key.endswith(("+", "?")):
        raise ConfigError(f"override '{item}': a key cannot end with '{key[-1]}'; write key=value")
    if "." in key or key == "stage":
        _set_checked(tree, key, value, label=key)
    else:
        _assign_lf(tree, key, value)


def _set_checked(tree: dict[str, Any], dotted: str, value: Any, label: str) -> None:
    # An LF key may add to a list ("path+": do_eval and do_predict each add a mode) or set a value only when
    # nothing set it yet ("path?": do_predict turns training off unless do_train says otherwise, in any key order).
    append, only_unset = dotted.endswith("+"), dotted.endswith("?")
    dotted = dotted.rstrip("+?")
    tp = field_type(RunConfig, dotted)
    try:
        coerce(value, tp, dotted)
    except ConfigError as err:
        raise ConfigError(f"{err}" if label == dotted else f"{label} -> {err}") from None
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{dotted}': '{part}' must be a section")
    if only_unset and parts[-1] in node:
        return
    if append:
        before = node.get(parts[-1], [])
        value = list(dict.fromkeys([*(before if isinstance(before, list) else [before]), *value]))
    node[parts[-1]] = value


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def dump(cfg: RunConfig) -> str:
    """The resolved config as YAML in our own dialect (the form written into the run folder)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
