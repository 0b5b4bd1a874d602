"""Whole objects from a pixel map: holes filled, specks dropped, touching glomeruli split, outlines smoothed.

A network votes pixel by pixel; a user counts and measures objects. The rules
here turn one into the other, object by object (each cropped to its box with a
margin), so the cost grows with the objects, not the image, and a whole-slide
run can apply them band by band (`ObjectSink`) with exactly the result of
`clean_labels` on the whole array.

Each object may only grow (hole filling, smoothing) onto pixels nearer to it than
to any other object, by a pixel and a half: two cleaned objects of a class then
never touch, so connected components — what GeoJSON export and Compare count —
are the objects cleaned here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..models.object_rules import ObjectRules

EIGHT = np.ones((3, 3), bool)  # objects are 8-connected while they are cleaned
NECK_RATIO = 0.7  # two cores split only where the neck between them is narrower than this share of the thinner
TERRITORY_PX = 1.5  # an object grows onto a pixel only if it is this much nearer to it than to any other


def clean_labels(labels: np.ndarray, mpp: float, rules: ObjectRules) -> np.ndarray:
    """Class ids (0 background, 1..K) with every object cleaned by `rules`, per class; `mpp`: um per pixel.

    Deterministic, and what a whole-slide run with the same rules writes for the same pixel map.
    """
    return clean_with_summary(labels, mpp, rules)[0]


def clean_with_summary(
    labels: np.ndarray,
    mpp: float,
    rules: ObjectRules | None,
    classes: dict[int, str] | None = None,
    out: np.ndarray | None = None,
):
    """`clean_labels` (or the labels unchanged without rules) and the `ObjectSummary` of the objects left.

    `out` may be `labels` itself: rows are read before they are written.
    """
    from .object_sink import ArrayCollector, ObjectSink

    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"labels must be a 2-D uint8 class-id image, not {labels.dtype} {labels.shape}")
    collector = ArrayCollector(labels.shape, out)
    sink = ObjectSink(collector, rules, mpp, labels.shape[0], classes=classes)
    for y in range(0, labels.shape[0], 1024):  # in bands, like a run: labelling holds one band at a time
        sink.write(y, labels[y : y + 1024])
    sink.flush()
    return collector.array, sink.summary()


@dataclass
class Cleaned:
    """One object after cleaning: its mask over the crop, the pixels of each piece left, and pieces dropped."""

    mask: np.ndarray
    areas: list[int]
    small: int


def clean_object(
    crop: np.ndarray,
    cls: int,
    box: tuple[int, int, int, int],
    seed: tuple[int, int],
    rules: ObjectRules | None,
    mpp: float,
    small_px: float = 0.0,
) -> Cleaned:
    """Clean the object of class `cls` holding pixel `seed` (crop coordinates) within `box` (r0, r1, c0, c1).

    `crop` holds the class ids around the box, with `rules.margin_px` of context
    where the image has it. Without rules the object stays as it is and only its
    pieces (4-connected, as exports count them) are measured; `small_px`: the area
    below which a piece counts as small.
    """
    r0, r1, c0, c1 = box
    inside = crop[r0:r1, c0:c1] == cls
    parts, _ = ndimage.label(inside, EIGHT)
    own = np.zeros(crop.shape, bool)
    own[r0:r1, c0:c1] = parts == parts[seed[0] - r0, seed[1] - c0]
    if rules is None:
        areas = _piece_areas(own)
        return Cleaned(own, areas, sum(a < small_px for a in areas))
    min_px = rules.min_area_um2 / mpp**2
    if (r1 - r0) * (c1 - c0) < min_px:  # filling and smoothing stay in the box: it can never be large enough
        return Cleaned(np.zeros(crop.shape, bool), [], 1)
    shape = own.copy()
    if rules.fill_holes:
        shape[r0:r1, c0:c1] = ndimage.binary_fill_holes(own[r0:r1, c0:c1])
    sigma = rules.smooth_um / mpp
    if sigma > 0:
        smooth = ndimage.gaussian_filter(shape.astype(np.float32), sigma, mode="constant", truncate=4.0) >= 0.5
        shape = np.zeros_like(shape)
        shape[r0:r1, c0:c1] = smooth[r0:r1, c0:c1]
    shape = _within_territory(shape, own, crop)
    parts, n = ndimage.label(shape, EIGHT)
    sizes = np.bincount(parts.ravel(), minlength=n + 1)
    small = int(np.sum(sizes[1:] < min_px))
    final = np.zeros(crop.shape, bool)
    for index, sl in enumerate(ndimage.find_objects(parts), start=1):
        if sl is None or sizes[index] < min_px:
            continue
        part = parts[sl] == index
        if rules.split_touching:
            part = split_touching(part, rules.split_min_um / mpp, math.sqrt(min_px / math.pi))
        final[sl] |= part
    pieces, n = ndimage.label(final)
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    dropped = np.flatnonzero(sizes < min_px)
    dropped = dropped[dropped > 0]
    if dropped.size:  # the split line can leave slivers
        final &= ~np.isin(pieces, dropped)
        small += int(dropped.size)
    return Cleaned(final, [int(s) for s in sizes[1:] if s >= min_px], small)


def _piece_areas(mask: np.ndarray) -> list[int]:
    pieces, n = ndimage.label(mask)
    return [int(s) for s in np.bincount(pieces.ravel(), minlength=n + 1)[1:]]


def _within_territory(shape: np.ndarray, own: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """`shape` without the pixels it gained that lie as near (within TERRITORY_PX) to another object as to this one."""
    gained = shape & ~own
    if not gained.any():
        return shape
    other = (crop != 0) & ~own
    if not other.any():
        return shape
    to_other = ndimage.distance_transform_edt(~other)
    to_self = ndimage.distance_transform_edt(~own)
    return shape & (own | (to_self + TERRITORY_PX < to_other))


def split_touching(part: np.ndarray, min_distance_px: float, min_core_px: float) -> np.ndarray:
    """One 8-connected mask as objects split at narrow necks (distance-transform watershed), a 1-px line apart.

    Cores are maxima of the distance to the background at least `min_distance_px`
    apart and `min_core_px` deep (so every piece can reach the minimum area); two
    pieces stay one where their neck is not narrower than NECK_RATIO of the thinner.
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    padded = np.pad(part, 1)
    distance = ndimage.distance_transform_edt(padded)[1:-1, 1:-1]
    peaks = peak_local_max(
        distance,
        min_distance=max(1, round(min_distance_px)),
        threshold_abs=max(min_core_px, 1.0),
        labels=part.astype(np.int32),
        exclude_border=False,
    )
    if len(peaks) < 2:
        return part
    markers = np.zeros(part.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    basins = watershed(-distance, markers, mask=part)
    basins = _merge_wide_necks(basins, distance, len(peaks))
    if basins.max() < 2:
        return part
    big = np.iinfo(np.int32).max
    lowest = ndimage.minimum_filter(np.where(basins > 0, basins, big), size=3, mode="constant", cval=big)
    return (basins > 0) & (lowest >= basins)  # a pixel next to a lower-numbered piece becomes the line


def _merge_wide_necks(basins: np.ndarray, distance: np.ndarray, n: int) -> np.ndarray:
    """Basins joined where the widest crossing between them is not a neck."""
    peak = ndimage.maximum(distance, basins, np.arange(1, n + 1))
    peak = np.concatenate([[0.0], np.asarray(peak, float)])
    codes, widths = [], []
    h, w = basins.shape
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = basins[: h - dy, max(0, -dx) : w - max(0, dx)]
        b = basins[dy:, max(0, dx) : w - max(0, -dx)]
        da = distance[: h - dy, max(0, -dx) : w - max(0, dx)]
        db = distance[dy:, max(0, dx) : w - max(0, -dx)]
        cross = (a > 0) & (b > 0) & (a != b)
        lo, hi = np.minimum(a[cross], b[cross]), np.maximum(a[cross], b[cross])
        codes.append(lo.astype(np.int64) * (n + 1) + hi)
        widths.append(np.minimum(da[cross], db[cross]))
    pairs, inverse = np.unique(np.concatenate(codes), return_inverse=True)
    neck = np.full(len(pairs), -1.0)
    np.maximum.at(neck, inverse, np.concatenate(widths))
    parent = list(range(n + 1))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for code, width in zip(pairs.tolist(), neck.tolist(), strict=True):
        i, j = divmod(code, n + 1)
        if width >= NECK_RATIO * min(peak[i], peak[j]):
            a, b = find(i), find(j)
            parent[max(a, b)] = min(a, b)
    roots = np.array([find(i) for i in range(n + 1)])
    _, dense = np.unique(roots, return_inverse=True)  # 0 stays 0: the background is its own root
    return dense.astype(np.int32)[basins]
