"""Name -> object registries; module name = registry key = Hydra option name."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from peft_lab.errors import UserError

__all__ = ["Registry", "import_all"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of components, filled by the `register` decorator.

    >>> METHODS = Registry("merge method")
    >>> @METHODS.register("linear")
    ... class Linear: ...
    """

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self.package = package  # imported on first lookup so every entry is registered
        self._entries: dict[str, T] = {}
        self._loaded = package is None

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            import_all(self.package)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(f"Unknown {self.kind} {name!r}. Available: {', '.join(self.names())}.") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def items(self) -> list[tuple[str, Any]]:
        self._load()
        return sorted(self._entries.items())


def import_all(package: str) -> None:
    """Import every module of `package` so their `register` decorators run."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
