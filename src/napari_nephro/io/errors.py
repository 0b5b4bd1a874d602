"""The one exception a user mistake about a slide turns into."""

from __future__ import annotations

from pathlib import Path


class SlideError(Exception):
    """A slide could not be opened or read; the message is one line naming the file.

    The CLI prints it as is and exits with status 2; the napari reader shows it as a
    notification. It never carries a traceback meant for the user.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # always one line
        super().__init__(f"{self.path}: {self.reason}")
