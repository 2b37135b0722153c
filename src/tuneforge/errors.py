"""User-facing errors: each carries one actionable message and is printed without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TuneforgeError(Exception):
    """Base class for errors caused by user input (config, data, paths); the CLI prints only the message."""


class ConfigError(TuneforgeError):
    """A config file, override or flag is wrong."""


class DataError(TuneforgeError):
    """A dataset definition, file or row is wrong."""


class TemplateError(TuneforgeError):
    """A chat template cannot render or mask a conversation correctly."""


class ModelError(TuneforgeError):
    """A model path, hub id or weight file cannot be resolved or loaded."""


class MissingDependencyError(TuneforgeError):
    """An optional package is needed for the requested feature."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
