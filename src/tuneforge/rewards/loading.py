"""Turn `reward_funcs` config entries into named reward functions.

An entry is one of:
- `"path/to/file.py:function"`: a function in a Python file; a relative path is taken from the working folder (or base_dir when given).
- `"package.module:function"`: a function in an importable module.
- `"accuracy"`, `"format"`, `"length"`, `"repetition"` (or `"builtin:<name>"`): a built-in with its defaults.
- a mapping `{func: <one of the above>, <setting>: <value>, ...}`: the settings are a built-in's options, or keyword
  arguments bound to a user function.
- a Python callable (for code that builds a RewardSet directly, e.g. a reward model wrapped as a function).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tuneforge.errors import ConfigError, did_you_mean
from tuneforge.rewards.builtins import BUILTINS

RewardEntry = str | Mapping[str, Any] | Callable[..., Any]

_FILE_MODULES: dict[Path, ModuleType] = {}


@dataclass(frozen=True)
class RewardFunction:
    """A loaded reward function: its metric name, the callable, and whether it takes **kwargs."""

    name: str
    fn: Callable[..., Any]
    accepts: frozenset[str] | None  # parameter names it accepts; None when it takes **kwargs (gets everything)


def load_reward_function(entry: RewardEntry, base_dir: Path | None = None) -> RewardFunction:
    """Resolve one config entry (see the module docstring) into a RewardFunction."""
    if callable(entry) and not isinstance(entry, str):
        return wrap(function_name(entry), entry)
    if isinstance(entry, Mapping):
        settings = dict(entry)
        if "func" not in settings:
            raise ConfigError(f"reward_funcs entry {dict(entry)!r} has no 'func' key; write {{func: <name>, ...}}")
        spec = settings.pop("func")
        if not isinstance(spec, str):
            raise ConfigError(f"reward_funcs entry {dict(entry)!r}: 'func' must be a string")
        return load_string(spec, settings, base_dir)
    if isinstance(entry, str):
        return load_string(entry, {}, base_dir)
    raise ConfigError(f"reward_funcs entry {entry!r} must be a string like 'file.py:fn' or a built-in name")


def load_string(spec: str, settings: dict[str, Any], base_dir: Path | None) -> RewardFunction:
    """Resolve 'builtin:name', a plain built-in name, 'file.py:fn' or 'module:fn' (+ settings)."""
    spec = spec.strip()
    builtin = spec.removeprefix("builtin:")
    if spec.startswith("builtin:") or ":" not in spec:
        if builtin not in BUILTINS:
            raise ConfigError(
                f"reward_funcs entry '{spec}': unknown built-in reward function.{did_you_mean(builtin, BUILTINS.names())}"
                f" Built-ins: {', '.join(BUILTINS.names())}; for your own function write 'path/to/file.py:function'"
                " or 'module:function'"
            )
        factory = BUILTINS.get(builtin)
        try:
            inspect.signature(factory).bind(**settings)
        except TypeError:
            options = ", ".join(inspect.signature(factory).parameters)
            raise ConfigError(
                f"reward_funcs entry '{spec}': unknown setting in {sorted(settings)}; '{builtin}' takes {options}"
            ) from None
        return wrap(builtin, factory(**settings))
    target, _, attr = spec.rpartition(":")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = load_file(spec, target, base_dir) if is_file else import_module(spec, target)
    if not attr or not hasattr(module, attr):
        where = f"file {target}" if is_file else f"module {target}"
        public = [n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n])]
        raise ConfigError(
            f"reward_funcs entry '{spec}': {where} has no function '{attr}'.{did_you_mean(attr, public)}"
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise ConfigError(f"reward_funcs entry '{spec}': '{attr}' is not callable (its type is {type(fn).__name__})")
    if settings:
        fn = functools.update_wrapper(functools.partial(fn, **settings), fn)
    return wrap(attr, fn)


def load_file(spec: str, target: str, base_dir: Path | None) -> ModuleType:
    """Execute a reward file once (cached by resolved path); its folder is importable while it loads."""
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(
            f"reward_funcs entry '{spec}': file {path} does not exist"
            + ("" if Path(target).is_absolute() else " (relative paths are taken from the folder tuneforge runs in)")
        )
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_spec = importlib.util.spec_from_file_location(f"tuneforge_reward_{path.stem}_{digest}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ConfigError(f"reward_funcs entry '{spec}': {path} has a syntax error at line {err.lineno}") from None
    finally:
        sys.path.remove(str(path.parent))
    _FILE_MODULES[path] = module
    return module


def import_module(spec: str, target: str) -> ModuleType:
    """Import `target`, turning a missing module into a ConfigError (errors inside the module propagate)."""
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        if err.name is not None and target.startswith(err.name):
            raise ConfigError(
                f"reward_funcs entry '{spec}': module '{target}' cannot be imported (no module '{err.name}'); "
                "for a file write 'path/to/file.py:function'"
            ) from None
        raise


def function_name(fn: Callable[..., Any]) -> str:
    """A callable's metric name: its __name__, else its class name."""
    name = getattr(fn, "__name__", None)  # partials and callable objects have none
    return name if isinstance(name, str) else type(fn).__name__


def wrap(name: str, fn: Callable[..., Any]) -> RewardFunction:
    """Record which keyword arguments fn accepts, so functions without **kwargs get only their own."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: pass everything
        return RewardFunction(name, fn, None)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return RewardFunction(name, fn, None)
    return RewardFunction(name, fn, frozenset(p.name for p in params))
