"""Optional dependencies are checked in one place, each with its install hint."""

from __future__ import annotations

import importlib.util

from tuneforge.errors import MissingDependencyError


def require(module: str, extra: str) -> None:
    """Raise with `pip install 'tuneforge[extra]'` when an optional package is missing."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"this feature needs the '{module}' package: pip install 'tuneforge[{extra}]'")


def available(module: str) -> bool:
    """Whether an optional package is installed."""
    return importlib.util.find_spec(module) is not None
