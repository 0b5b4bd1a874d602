"""Atomic writes that never overwrite a user's file unless asked."""

from __future__ import annotations

import os
from pathlib import Path

from ..common.atomic import atomic_output
from .errors import AnnotationError


def check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise AnnotationError(path, "already exists; pass overwrite=True (--overwrite) to replace it")
    if not path.parent.exists():
        raise AnnotationError(path, f"folder {path.parent} does not exist")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False) -> Path:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path = Path(path)
    check_target(path, overwrite)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return path
