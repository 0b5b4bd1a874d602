"""Pixel Dice and IoU, on numpy arrays or blockwise on dask arrays (a whole-slide mask never in memory)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import dask
import dask.array as da
import numpy as np

from ._ratio import ratio


@dataclass(frozen=True)
class PixelScores:
    tp: int
    fp: int
    fn: int
    dice: float | None  # None: neither prediction nor truth has a pixel of this class
    iou: float | None

    @classmethod
    def from_counts(cls, tp: int, fp: int, fn: int) -> PixelScores:
        return cls(int(tp), int(fp), int(fn), ratio(2 * tp, 2 * tp + fp + fn), ratio(tp, tp + fp + fn))

    def as_dict(self) -> dict:
        return asdict(self)


def _check_shapes(pred, truth) -> None:
    if tuple(pred.shape) != tuple(truth.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground-truth shape {tuple(truth.shape)}")


def pixel_scores(pred, truth) -> PixelScores:
    """Foreground (non-zero) agreement of two masks or label images."""
    _check_shapes(pred, truth)
    p, t = pred != 0, truth != 0
    counts = (p & t).sum(), (p & ~t).sum(), (~p & t).sum()
    if any(isinstance(a, da.Array) for a in (pred, truth)):
        counts = dask.compute(*counts)
    return PixelScores.from_counts(*counts)


def pixel_scores_per_class(pred_classes, truth_classes, class_names: Sequence[str]) -> dict[str, PixelScores]:
    """Scores per class from two rasters of class ids (0 background, i + 1 for class_names[i]).

    One pass over the data: a joint histogram of (truth, prediction) class pairs,
    blockwise when the inputs are dask arrays.
    """
    _check_shapes(pred_classes, truth_classes)
    n = len(class_names) + 1
    if isinstance(pred_classes, da.Array) or isinstance(truth_classes, da.Array):
        p = da.asarray(pred_classes)
        t = da.asarray(truth_classes).rechunk(p.chunks)
        parts = [
            dask.delayed(_joint_block)(tb, pb, n)
            for tb, pb in zip(t.to_delayed().ravel(), p.to_delayed().ravel(), strict=True)
        ]
        hist = np.sum(dask.compute(*parts), axis=0)
    else:
        hist = _joint_block(np.asarray(truth_classes), np.asarray(pred_classes), n)
    return per_class_from_histogram(hist, class_names)


def per_class_from_histogram(hist: np.ndarray, class_names: Sequence[str]) -> dict[str, PixelScores]:
    """Scores per class from a joint histogram of (truth class, prediction class): index truth * n + prediction."""
    n = len(class_names) + 1
    table = np.asarray(hist).reshape(n, n)  # rows truth, columns prediction
    out = {}
    for c, name in enumerate(class_names, start=1):
        tp = table[c, c]
        out[name] = PixelScores.from_counts(tp, table[:, c].sum() - tp, table[c, :].sum() - tp)
    return out


def _joint_block(t: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    t, p = t.astype(np.int64, copy=False), p.astype(np.int64, copy=False)
    if t.min(initial=0) < 0 or t.max(initial=0) >= n or p.min(initial=0) < 0 or p.max(initial=0) >= n:
        raise ValueError(f"class ids must be between 0 and {n - 1}")
    return np.bincount((t * n + p).ravel(), minlength=n * n)
