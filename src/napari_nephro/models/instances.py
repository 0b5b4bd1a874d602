"""What the instance engine needs of a nuclei model, whatever its library: tiles in, numbered objects out.

A semantic `Segmenter` gives probabilities that the engine blends across tiles;
an instance model gives objects, which cannot be blended. So an
`InstanceSegmenter` returns, per tile, a label image and each object's class and
score, and the engine (`inference.instance_engine`) keeps each object in exactly
one tile: the one whose core holds its centre. `overlap` is the halo: it must be
larger than the largest object, so an object whose centre is in a tile's core
lies whole inside that tile.

Nothing here imports torch, TensorFlow or cellpose: adapters import their own
library when they are built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np


@dataclass
class TileInstances:
    """One tile's objects: `labels` (H, W) with ids 1..n (0 is background), and per id its class and score.

    `classes[i]` and `scores[i]` belong to label `i + 1`; `classes` index the
    segmenter's `classes` list (0 is its first class).
    """

    labels: np.ndarray
    classes: np.ndarray  # (n,) int
    scores: np.ndarray  # (n,) float32 in [0, 1]

    @classmethod
    def from_labels(cls, labels: np.ndarray, classes=None, scores=None) -> TileInstances:
        """Renumber any label image to 1..n (in order of first appearance by id), carrying classes and scores
        given per *original* id (arrays indexed by id, or None: class 0, score 1)."""
        labels = np.asarray(labels)
        ids = np.unique(labels)
        ids = ids[ids != 0]
        lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
        compact = lut[labels] if labels.size else labels.astype(np.int32)
        cls_ = np.zeros(ids.size, np.int64) if classes is None else np.asarray(classes)[ids].astype(np.int64)
        score = np.ones(ids.size, np.float32) if scores is None else np.asarray(scores, np.float32)[ids]
        return cls(compact.astype(np.int32), cls_, score)

    @property
    def count(self) -> int:
        return int(self.classes.size)


class InstanceSegmenter(Protocol):
    """A nuclei (or any instance) model as the engine sees it."""

    kind: Literal["instance"]
    classes: list[str]  # class names; a model without types has one, e.g. ["nucleus"]
    mpp: float  # micrometres per pixel the model works at (tiles are read at it)
    tile_size: int  # tile side at `mpp`
    overlap: int  # halo between tiles at `mpp`: more than the largest object's diameter
    fingerprint: str  # identifies weights and options, so a resumed run checks it is the same model
    device: object  # what it runs on ('cpu', a torch.device, ...), recorded with a run

    def predict_instances(self, tiles: np.ndarray) -> list[TileInstances]:
        """(N, tile, tile, 3) uint8 RGB -> one TileInstances per tile, at tile size."""
        ...


def is_instance(model) -> bool:
    return getattr(model, "kind", "semantic") == "instance"
