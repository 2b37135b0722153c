"""One small generic registry: register by decorator beside the definition, look up with did-you-mean."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from tuneforge.errors import TuneforgeError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one family (stages, formats, templates, ...)."""

    def __init__(self, family: str, error: type[TuneforgeError] = TuneforgeError) -> None:
        self.family = family
        self._error = error
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers the decorated object under `name`."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        """Register `obj` under `name`; a second registration of a name is a programming error."""
        if name in self._entries:
            raise ValueError(f"{self.family} '{name}' is registered twice")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        """Return the entry called `name`, or raise with the known names and a did-you-mean."""
        if name not in self._entries:
            raise self._error(
                f"unknown {self.family} '{name}'.{did_you_mean(name, self._entries)} "
                f"Known: {', '.join(self.names())}"
            )
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        """Registered names, sorted (for help texts and UI dropdowns)."""
        return sorted(self._entries)
