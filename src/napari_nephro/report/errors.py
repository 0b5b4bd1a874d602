"""The one error type a report raises for a user's mistake."""

from __future__ import annotations


class ReportError(Exception):
    """A missing, unreadable or mismatched result for a report, or a place it cannot be written: one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
