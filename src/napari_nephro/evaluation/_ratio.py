"""A ratio that admits it is undefined."""

from __future__ import annotations


def ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else float(numerator) / float(denominator)
