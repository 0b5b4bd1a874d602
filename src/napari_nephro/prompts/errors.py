"""The one exception a user's prompt mistake turns into."""

from __future__ import annotations


class PromptError(Exception):
    """A prompt set cannot be built, read or used as asked; the message is one line saying what to do."""
