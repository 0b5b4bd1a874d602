"""The one exception a bad checkpoint, config or device request turns into."""

from __future__ import annotations


class ModelError(Exception):
    """A model cannot be built, loaded or placed; the message is one line saying what to do."""
