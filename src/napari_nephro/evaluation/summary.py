"""Per-crop scores, per-object tables, and mean ± standard deviation across images."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .blockwise import BoxCounts, ObjectBoxes, blocks, grown_box, parallel_map, read_block
from .instances import MatchResult
from .pixel import PixelScores

DEFAULT_CROP_MARGIN = 0.25


def per_crop(pred, truth, margin: float = DEFAULT_CROP_MARGIN) -> list[dict]:
    """Dice of each ground-truth object cut out with a margin, as the BMC Nephrology paper scores crops.

    The crop is the object's box grown by `margin` of its size on every side,
    clipped to the image; inside it, predicted foreground is scored against the
    ground-truth foreground (neighbours reaching into the margin included).
    Two passes block by block (boxes, then counts), so any array that slices will do.
    """
    if tuple(np.shape(truth)) != tuple(np.shape(pred)):
        raise ValueError(f"prediction shape {np.shape(pred)} differs from ground-truth shape {np.shape(truth)}")
    shape = tuple(np.shape(truth))

    def boxes_of(box):
        found = ObjectBoxes()
        found.add(read_block(truth, *box), box[0], box[2])
        return found

    boxes = ObjectBoxes()
    for part in parallel_map(boxes_of, blocks(shape)):
        boxes.merge(part)
    crops = crop_counts(boxes.boxes(), margin, shape)
    count_crops(crops, lambda box: (read_block(pred, *box), read_block(truth, *box)), shape)
    return crop_rows(boxes.boxes(), crops)


def count_crops(crops: BoxCounts, read, shape: tuple[int, int]) -> None:
    """Fill `crops` from the blocks they meet; `read(box)` gives (prediction, truth) labels of a block."""

    def count(box):
        which = crops.wants(*box)
        if not which.size:
            return which, None
        p, t = read(box)
        return which, crops.count(p != 0, t != 0, box[0], box[2], which)

    for which, counts in parallel_map(count, blocks(shape)):
        if counts is not None:
            crops.add(which, counts)


def crop_counts(boxes: dict, margin: float, shape: tuple[int, int]) -> BoxCounts:
    """Counters for the grown box of each object (`ObjectBoxes.boxes()`), in id order."""
    return BoxCounts([grown_box(b, margin, shape) for b in boxes.values()])


def crop_rows(boxes: dict, crops: BoxCounts) -> list[dict]:
    """One row per object: its id, crop box [x0, y0, x1, y1], and Dice and IoU inside it."""
    rows = []
    for truth_id, (y0, y1, x0, x1), (tp, fp, fn) in zip(boxes, crops.boxes.tolist(), crops.counts, strict=True):
        scores = PixelScores.from_counts(tp, fp, fn)
        rows.append({"truth_id": int(truth_id), "box": [x0, y0, x1, y1], "dice": scores.dice, "iou": scores.iou})
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
