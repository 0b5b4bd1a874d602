"""Fused ratings and agreement between models (Guo et al., Communications Medicine).

A patch is good when any model's prediction on it is good: that prediction can
serve as its label. It is bad only when every model failed on it: those are the
patches worth a person's correction. Agreement says how often two models were
rated alike, which tells whether the models fail on the same patches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from . import layout
from .consensus import disagreements, effective_ratings

Ratings = dict[tuple[str, str], str]
SHARES = ("all agree", "some agree", "none agree")
UNRATED = "unrated"


def fuse(ratings: Ratings, patches: list[str], models: list[str]) -> dict[str, str | None]:
    """patch -> fused rating: good if any model is good, bad only if all are bad, else medium.

    None while a model is unrated and its rating could still change the result
    (no model is good yet).
    """
    out: dict[str, str | None] = {}
    for patch in patches:
        given = [ratings.get((patch, m)) for m in models]
        if "good" in given:
            out[patch] = "good"
        elif None in given or not given:
            out[patch] = None
        else:
            out[patch] = "bad" if all(r == "bad" for r in given) else "medium"
    return out


def rating_counts(ratings: Ratings, models: list[str]) -> dict[str, dict[str, int]]:
    """model -> rating -> number of patches so rated."""
    counts = {m: dict.fromkeys(layout.RATINGS, 0) for m in models}
    for (_, model), rating in ratings.items():
        if model in counts and rating in counts[model]:
            counts[model][rating] += 1
    return counts


def fused_counts(fused: dict[str, str | None]) -> dict[str, int]:
    """rating -> number of patches with that fused rating (patches not decided yet are not counted)."""
    counts = dict.fromkeys(layout.RATINGS, 0)
    for rating in fused.values():
        if rating is not None:
            counts[rating] += 1
    return counts


def agreement_matrix(ratings: Ratings, patches: list[str], models: list[str]) -> np.ndarray:
    """(models x models): the share of patches rated for both models where the two ratings are equal.

    The diagonal is 1; a pair with no patch rated for both is NaN.
    """
    k = len(models)
    matrix = np.eye(k)
    for i, j in combinations(range(k), 2):
        pairs = [(ratings.get((p, models[i])), ratings.get((p, models[j]))) for p in patches]
        both = [(a, b) for a, b in pairs if a is not None and b is not None]
        share = sum(a == b for a, b in both) / len(both) if both else np.nan
        matrix[i, j] = matrix[j, i] = share
    return matrix


def complete_patches(ratings: Ratings, patches: list[str], models: list[str]) -> list[str]:
    """The patches rated for every model."""
    return [p for p in patches if all((p, m) in ratings for m in models)]


def agreement_shares(ratings: Ratings, patches: list[str], models: list[str]) -> dict[str, float | None]:
    """Over patches rated for every model, the share where all models got one rating ("all agree"), where at
    least two share a rating but not all ("some agree"), and where every model's rating differs ("none agree").

    None for each when no patch is rated for every model yet.
    """
    complete = complete_patches(ratings, patches, models)
    counts = dict.fromkeys(SHARES, 0)
    for patch in complete:
        distinct = len({ratings[(patch, m)] for m in models})
        if distinct == 1:
            counts["all agree"] += 1
        elif distinct < len(models):
            counts["some agree"] += 1
        else:
            counts["none agree"] += 1
    if not complete:
        return dict.fromkeys(SHARES, None)
    return {name: n / len(complete) for name, n in counts.items()}


@dataclass
class FusionReport:
    """Everything `nephro review fuse` shows and writes, from the ratings that count (`effective_ratings`)."""

    root: Path
    task: str
    patches: list[str]
    models: list[str]
    ratings: Ratings
    fused: dict[str, str | None]
    rating_counts: dict[str, dict[str, int]]
    fused_counts: dict[str, int]
    agreement: np.ndarray
    shares: dict[str, float | None]
    complete: int  # patches rated for every model: what `shares` are over
    raters: list[str] = field(default_factory=list)
    disagreements: int = 0  # (patch, model) pairs the raters differ on, not adjudicated: left out of `ratings`

    @property
    def undecided(self) -> int:
        """Patches whose fused rating still waits on a rating."""
        return sum(r is None for r in self.fused.values())

    def summary(self) -> str:
        lines = [f"{len(self.patches)} patches, {len(self.models)} models, raters: {', '.join(self.raters) or 'none'}"]
        for model, counts in self.rating_counts.items():
            lines.append(f"  {model}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        fused = ", ".join(f"{k} {v}" for k, v in self.fused_counts.items())
        lines.append(f"fused: {fused}, {UNRATED} {self.undecided}")
        if self.complete:
            shares = ", ".join(f"{k} {v:.0%}" for k, v in self.shares.items())
            lines.append(f"agreement over {self.complete} fully rated patches: {shares}")
        if self.disagreements:
            lines.append(f"{self.disagreements} disagreement(s) between raters wait for adjudication")
        return "\n".join(lines)


def fusion_report(root: str | os.PathLike[str]) -> FusionReport:
    """The fused ratings, counts and agreement of a project, from every rater's file."""
    root = Path(root)
    project = layout.read_project(root)
    patches = [p.patch for p in layout.read_patches(root)]
    models = project.model_names
    ratings = effective_ratings(root)
    fused = fuse(ratings, patches, models)
    return FusionReport(
        root=root,
        task=project.task,
        patches=patches,
        models=models,
        ratings=ratings,
        fused=fused,
        rating_counts=rating_counts(ratings, models),
        fused_counts=fused_counts(fused),
        agreement=agreement_matrix(ratings, patches, models),
        shares=agreement_shares(ratings, patches, models),
        complete=len(complete_patches(ratings, patches, models)),
        raters=layout.raters(root),
        disagreements=len(disagreements(root)),
    )
