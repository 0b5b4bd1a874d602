"""Per-crop scores, per-object tables, and mean ± standard deviation across images."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from .instances import MatchResult
from .pixel import pixel_scores

DEFAULT_CROP_MARGIN = 0.25


def per_crop(pred: np.ndarray, truth: np.ndarray, margin: float = DEFAULT_CROP_MARGIN) -> list[dict]:
    """Dice of each ground-truth object cut out with a margin, as the BMC Nephrology paper scores crops.

    The crop is the object's box grown by `margin` of its size on every side,
    clipped to the image; inside it, predicted foreground is scored against the
    ground-truth foreground (neighbours reaching into the margin included).
    """
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {truth.shape}")
    rows = []
    for index, sl in enumerate(ndimage.find_objects(_integer(truth)), start=1):
        if sl is None:
            continue
        grown = tuple(
            slice(
                max(0, s.start - round(margin * (s.stop - s.start))),
                min(n, s.stop + round(margin * (s.stop - s.start))),
            )
            for s, n in zip(sl, truth.shape, strict=True)
        )
        scores = pixel_scores(pred[grown], truth[grown])
        rows.append(
            {
                "truth_id": index,
                "box": [grown[1].start, grown[0].start, grown[1].stop, grown[0].stop],
                "dice": scores.dice,
                "iou": scores.iou,
            }
        )
    return rows


def object_table(
    result: MatchResult,
    *,
    truth_classes: Mapping[int, str] | None = None,
    mpp: float | None = None,
) -> list[dict]:
    """One row per object: id, which side, class, area (px, and um^2 when mpp is known), match, IoU."""
    by_truth = {t: (p, iou) for t, p, iou in result.pairs}
    by_pred = {p: (t, iou) for t, p, iou in result.pairs}
    rows = []
    for side, areas, matches in (("truth", result.true_areas, by_truth), ("prediction", result.pred_areas, by_pred)):
        for obj, area in areas.items():
            other, iou = matches.get(int(obj), (None, None))
            rows.append(
                {
                    "id": int(obj),
                    "side": side,
                    "class": (truth_classes or {}).get(int(obj) if side == "truth" else other, None),
                    "area_px": int(area),
                    "area_um2": None if mpp is None else float(area) * mpp * mpp,
                    "matched_id": other,
                    "iou": iou,
                    "outcome": "TP" if other is not None else ("FN" if side == "truth" else "FP"),
                }
            )
    return rows


def summarize(results: Iterable[Mapping[str, float | None]], keys: Sequence[str]) -> dict[str, dict]:
    """Mean, standard deviation (ddof 1, as the papers' tables) and count per metric, ignoring undefined values."""
    results = list(results)
    out = {}
    for key in keys:
        values = np.array([r[key] for r in results if r.get(key) is not None], float)
        out[key] = {
            "mean": float(values.mean()) if values.size else None,
            "std": float(values.std(ddof=1)) if values.size > 1 else None,
            "n": int(values.size),
        }
    return out


def _integer(labels: np.ndarray) -> np.ndarray:
    """Integer labels as they are (find_objects takes any integer type); only bool or float is converted."""
    return labels if labels.dtype.kind in "ui" else labels.astype(np.int64)
