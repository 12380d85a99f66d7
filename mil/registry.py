"""A small name -> factory registry that rejects duplicate and unknown keys.

An entry may carry metadata next to the factory (``register(name, **info)``), e.g. a
model's training defaults (``train_defaults``, see :mod:`mil.models.base`).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownKeyError(KeyError):
    """An unknown registry key; the message lists what is available."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps registry keys (e.g. ``"gated_abmil"``) to factories.

    Used as a decorator: ``@MODELS.register("abmil")``, or with metadata:
    ``@MODELS.register("dsmil", train_defaults={"lr": 1e-3})``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **info: Any) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            self._info[name] = dict(info)
            return obj

        return decorator

    def info(self, name: str) -> dict[str, Any]:
        """The metadata registered with ``name`` (a copy; empty when none was given)."""
        self.get(name)  # unknown name: the usual error with suggestions
        return copy.deepcopy(self._info[name])

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownKeyError(
                f"Unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
