"""A tiny name -> factory registry: backends and variants are data, not if/elif chains."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to a factory; unknown names fail with the list of known ones.

    ``plugins`` names modules that register more items when imported (a package of its own such
    as :mod:`ood_core.world`); they are imported on the first lookup that needs them, so a
    registry stays cheap to import and its owner never imports the plug-in.
    """

    def __init__(self, kind: str, plugins: tuple[str, ...] = ()):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._plugins = plugins
        self._plugins_loaded = not plugins

    def _load_plugins(self) -> None:
        if not self._plugins_loaded:
            self._plugins_loaded = True
            for module in self._plugins:
                importlib.import_module(module)

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """Register ``item`` under ``name``; usable as a decorator when ``item`` is omitted."""
        if item is not None:
            self._items[name] = item
            return item

        def deco(obj: T) -> T:
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load_plugins()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none registered)"
            raise KeyError(f"unknown {self.kind} '{name}': known {self.kind}s are {known}") from None

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        if name not in self._items:
            self._load_plugins()
        return name in self._items
