"""The one exception a bad annotation file or request turns into."""

from __future__ import annotations

from pathlib import Path


class AnnotationError(Exception):
    """An annotation file cannot be read or written; the message is one line naming the file."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}" if self.path else self.reason)
