"""Measured counts beside a rating: objects per model and how far the models' predictions agree.

They help the rater look (two models that disagree on a patch deserve a closer
look) and pick an easy pair, but never rate for them. Agreement is the F1 of a
one-to-one matching at IoU 0.5, the measure the paper reports, computed on the
two label TIFFs; a 512 px patch with three models takes a few tens of ms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from ..evaluation.instances import match_instances
from . import layout

IOU = 0.5


@dataclass
class PatchStats:
    """What was measured on one patch; models without a prediction on it are absent."""

    patch: str
    objects: dict[str, int] = field(default_factory=dict)  # model -> objects predicted
    agreement: dict[tuple[str, str], float] = field(default_factory=dict)  # (model a, model b) -> F1, both orders

    def f1(self, a: str, b: str) -> float | None:
        return 1.0 if a == b and a in self.objects else self.agreement.get((a, b))

    def mean_agreement(self, model: str) -> float | None:
        """Mean F1 of `model`'s prediction against every other model's; None without another prediction."""
        values = [f for (a, _), f in self.agreement.items() if a == model]
        return float(np.mean(values)) if values else None


def patch_stats(root: str | os.PathLike[str], patch: str, models: list[str] | None = None) -> PatchStats:
    """Objects per model on `patch` and the pairwise F1 at IoU 0.5 between their predictions.

    Two predictions that both find nothing agree fully (F1 1). `models` defaults
    to the project's.
    """
    root = Path(root)
    if models is None:
        models = layout.read_project(root).model_names
    labels = {}
    for model in models:
        path = layout.prediction_tif(root, model, patch)
        if path.is_file():
            labels[model] = layout.read_labels(path)
    stats = PatchStats(patch, {m: _count(a) for m, a in labels.items()})
    for a, b in combinations(labels, 2):
        if labels[a].shape != labels[b].shape:
            raise layout.ReviewError(
                f"{patch}: the predictions of {a} and {b} differ in size "
                f"({labels[a].shape} vs {labels[b].shape}); run nephro review predict again"
            )
        f1 = match_instances(labels[a], labels[b], IOU).f1
        stats.agreement[(a, b)] = stats.agreement[(b, a)] = 1.0 if f1 is None else f1
    return stats


def _count(labels: np.ndarray) -> int:
    ids = np.unique(labels)
    return int(ids.size - (ids[0] == 0 if ids.size else 0))
