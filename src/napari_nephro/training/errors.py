"""The one error type training raises for a user's mistake."""

from pathlib import Path


class TrainingError(Exception):
    """Wrong training data or settings: printed as one line, before any training starts."""


def state_dir(out: Path) -> Path:
    """Where a training run into checkpoint folder `out` keeps its resumable state."""
    return out.with_name(out.name + ".training")
