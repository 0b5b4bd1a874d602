"""One rating per (patch, model) from several raters: what they agree on, or what the adjudicator settled.

Raters are blind to each other (each writes `ratings/<rater>.csv`), so their
ratings can differ; only agreed or adjudicated ratings count for fusion and the
easy / hard sets. A rating no one else gave is agreed by its only rater.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import layout

Key = tuple[str, str]  # (patch, model)


@dataclass(frozen=True)
class Disagreement:
    """A (patch, model) the raters rated differently and nobody has adjudicated yet."""

    patch: str
    model: str
    ratings: dict[str, str]  # rater -> rating


def _raters(root: Path, raters: list[str] | None) -> list[str]:
    names = layout.raters(root) if raters is None else list(raters)
    return [r for r in dict.fromkeys(names) if r != layout.ADJUDICATOR]


def _by_key(root: Path, raters: list[str]) -> dict[Key, dict[str, str]]:
    out: dict[Key, dict[str, str]] = {}
    for rater in raters:
        for key, rating in layout.read_ratings(root, rater).items():
            out.setdefault(key, {})[rater] = rating
    return out


def effective_ratings(root: str | os.PathLike[str], raters: list[str] | None = None) -> dict[Key, str]:
    """(patch, model) -> the rating that counts: the adjudicator's, else the one every rater who rated it gave.

    `raters` limits whose files are read (all raters when None); the adjudicator's
    file always is, and never counts as a rater. Disagreements not yet settled are
    left out, as if unrated.
    """
    root = Path(root)
    settled = layout.read_ratings(root, layout.ADJUDICATOR)
    out: dict[Key, str] = {}
    for key, given in _by_key(root, _raters(root, raters)).items():
        values = set(given.values())
        if key not in settled and len(values) == 1:
            out[key] = values.pop()
    out.update(settled)
    return dict(sorted(out.items()))


def disagreements(root: str | os.PathLike[str], raters: list[str] | None = None) -> list[Disagreement]:
    """What the raters rated differently and the adjudicator has not settled, in patch then model order."""
    root = Path(root)
    settled = layout.read_ratings(root, layout.ADJUDICATOR)
    rank = _model_rank(root)
    found = [
        Disagreement(patch, model, dict(sorted(given.items())))
        for (patch, model), given in _by_key(root, _raters(root, raters)).items()
        if (patch, model) not in settled and len(set(given.values())) > 1
    ]
    return sorted(found, key=lambda d: (d.patch, rank.get(d.model, len(rank)), d.model))


def adjudicate(root: str | os.PathLike[str], patch: str, model: str, rating: str) -> layout.Rating:
    """Settle one (patch, model): the adjudicator's rating counts over every rater's."""
    return layout.append_rating(root, layout.ADJUDICATOR, patch, model, rating)


def _model_rank(root: Path) -> dict[str, int]:
    if not layout.is_project(root):
        return {}
    return {name: i for i, name in enumerate(layout.read_project(root).model_names)}
