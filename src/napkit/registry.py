"""One name -> builder registry (timm style) for every pluggable kind: models, datasets, criteria.

An unknown name raises :class:`~napkit.errors.NapkitError` listing the valid ones, so every
``create_*`` function gives the same one-line error for a typo in a config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from napkit.errors import unknown_choice

T = TypeVar("T")


class Registry(Generic[T]):
    """Builders or classes of one kind (``kind`` names it in errors), looked up by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` as ``name``; a second registration of a name is a programming error."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def named(self, name: str) -> Callable[[T], T]:
        """Class decorator: register under ``name`` and set the class's ``name`` attribute to it."""

        def deco(cls: T) -> T:
            cls.name = name  # type: ignore[attr-defined]
            return self.add(name, cls)

        return deco

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def get(self, name: str) -> T:
        """The item registered as ``name``; an unknown name lists the valid ones."""
        if name not in self._items:
            raise unknown_choice(self.kind, name, self._items)
        return self._items[name]
