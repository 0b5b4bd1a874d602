"""The one error type training raises for a user's mistake."""

from pathlib import Path


class TrainingError(Exception):
    """Wrong training data or settings: printed as one line, before any training starts."""


STATE = "state.pt"  # in the state folder once an epoch has finished: what makes a run resumable


def state_dir(out: Path) -> Path:
    """Where a training run into checkpoint folder `out` keeps its resumable state."""
    return out.with_name(out.name + ".training")


def resumable(out: Path) -> bool:
    """Whether a run into `out` finished an epoch that `--resume` can go on from."""
    return (state_dir(out) / STATE).is_file()
