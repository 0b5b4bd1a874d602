"""The one error type training raises for a user's mistake."""


class TrainingError(Exception):
    """Wrong training data or settings: printed as one line, before any training starts."""
