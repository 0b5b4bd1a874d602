"""Packages whose heavy parts (torch, scipy, transformers) load on first use, so `nephro` starts fast."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def lazy_attributes(package: str, names: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` that imports `package.<names[name]>` when `name` is first asked for."""

    def __getattr__(name: str):
        if name in names:
            return getattr(import_module(f".{names[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
