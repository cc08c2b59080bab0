"""A named registry whose built-in entries register themselves when their modules are first imported: the one
mechanism behind the model families, the task kinds and the analyses."""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, builtin: tuple[str, ...], error: type[Exception] = ValueError):
        self.what, self.builtin, self.error = what, builtin, error
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, item: T) -> T:
        """Add ``item`` under ``item.name`` (a module calls this at import time)."""
        self._items[item.name] = item
        return item

    def all(self) -> dict[str, T]:
        if not self._loaded:
            self._loaded = True
            for mod in self.builtin:
                importlib.import_module(mod)
        return dict(self._items)

    def get(self, name: str) -> T:
        items = self.all()
        if name not in items:
            raise self.error(f"unknown {self.what} {name!r}; choose from {', '.join(items)}")
        return items[name]
