"""Strict conversion between nested dicts and the typed config dataclasses."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import types
import typing
from typing import Any, Literal, Union

from tuneforge.errors import ConfigError, did_you_mean

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a dict; unknown keys and wrong types raise ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(
                f"{_join(where, key)}: unknown key.{did_you_mean(str(key), names)} "
                f"Keys allowed here: {', '.join(names)}"
            )
    kwargs = {key: coerce(value, hints[key], _join(where, key)) for key, value in data.items()}
    return cls(**kwargs)


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert one value to type `tp`, accepting the string forms a CLI override or LF YAML produces."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), where)
    if origin is Literal:
        return _coerce_literal(value, typing.get_args(tp), where)
    if origin is list:
        return _coerce_list(value, typing.get_args(tp)[0], where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    return _coerce_scalar(value, tp, where)


def _coerce_union(value: Any, args: tuple, where: str) -> Any:
    if value is None or (isinstance(value, str) and value.lower() in {"none", "null", "~"}):
        if type(None) in args:
            return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce(value, arg, where)
        except ConfigError as err:
            errors.append(str(err))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {_type_name(args)}")


def _coerce_literal(value: Any, allowed: tuple, where: str) -> Any:
    if value in allowed:
        return value
    text = str(value)
    raise ConfigError(
        f"{where}: {text!r} is not allowed.{did_you_mean(text, [str(a) for a in allowed])} "
        f"Choose one of: {', '.join(str(a) for a in allowed)}"
    )


def _coerce_list(value: Any, item: Any, where: str) -> list:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]


def _coerce_scalar(value: Any, tp: type, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected text, got {value!r}")
    raise TypeError(f"config type {tp} is not supported by the converter")


def to_dict(obj: Any) -> dict[str, Any]:
    """Nested plain dict of a config dataclass (for YAML output)."""
    return dataclasses.asdict(obj)


def flatten(tree: dict[str, Any], leaves: tuple[str, ...] = (), prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: value}; mappings under a key named in `leaves` stay whole values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in leaves:
            out.update(flatten(value, leaves, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def field_type(cls: type, dotted: str) -> Any:
    """The declared type at a dotted path, raising ConfigError with did-you-mean for an unknown key."""
    tp: Any = cls
    walked = []
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            if typing.get_origin(tp) is dict:
                return Any
            raise ConfigError(f"'{dotted}': '{'.'.join(walked)}' is a value, not a section")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise ConfigError(
                f"'{dotted}': unknown key '{part}'.{did_you_mean(part, hints)} "
                f"Keys allowed in {'.'.join(walked) or 'the top level'}: {', '.join(hints)}"
            )
        tp = hints[part]
        walked.append(part)
    return tp


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstring line written under each field of a dataclass (for help texts and the web UI)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value).strip()  # type: ignore[union-attr]
    return docs


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _type_name(args: tuple) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in args if a is not type(None))
