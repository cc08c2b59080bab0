"""A named registry whose entries register themselves when their modules are first imported: the one mechanism
behind the model families, the task kinds and the analyses. Built-in entries are the modules listed in the
package; other installed packages add theirs through an entry-point group (``wrapperlab.model_families``,
``wrapperlab.task_kinds``, ``wrapperlab.analyses``) whose entries name modules to import."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class PluginError(ImportError):
    """An installed plugin named by an entry point failed to import (one line naming it and its error)."""


class Registry(Generic[T]):
    def __init__(self, what: str, builtin: tuple[str, ...], error: type[Exception] = ValueError,
                 group: str | None = None):
        self.what, self.builtin, self.error, self.group = what, builtin, error, group
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
            for ep in entry_points(group=self.group) if self.group else ():
                try:
                    importlib.import_module(ep.value.split(":")[0])
                except Exception as e:
                    self._loaded = False  # the same failure again next time, never a half-loaded registry
                    raise PluginError(f"{self.what} plugin {ep.name!r} ({ep.value}, entry point group "
                                     f"{self.group}) failed to import: {type(e).__name__}: {e}") from e
        return dict(self._items)

    def get(self, name: str) -> T:
        items = self.all()
        if name not in items:
            raise self.error(f"unknown {self.what} {name!r}; choose from {', '.join(items)}")
        return items[name]
