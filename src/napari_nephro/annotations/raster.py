"""Polygons <-> label rasters, at any pyramid level and for any region, without a level-0 raster.

A pixel belongs to a polygon when its centre is inside it or on its edge (and not
strictly inside a hole). Pixel (row i, column j) of a level with downsample `ds`
whose region starts at level-0 (x0, y0) covers level-0 [j * ds + x0, (j + 1) * ds + x0]
and has its centre half a pixel in; outlines made from pixels follow pixel edges.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from itertools import pairwise

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon

from .model import UNCLASSIFIED, Annotation, AnnotationSet, as_area


def rasterize(
    annotations: AnnotationSet,
    shape: tuple[int, int],
    *,
    downsample: float = 1.0,
    origin: tuple[float, float] = (0.0, 0.0),
    values: str = "instance",
    dtype: type = np.uint32,
) -> np.ndarray:
    """Draw annotations into an (h, w) raster covering `shape` pixels of a level.

    `origin` is the region's top-left corner in level-0 pixels (x0, y0). `values` is
    "instance" (1, 2, ... in order; later objects cover earlier ones) or "class"
    (`annotations.class_id(label)`). Only objects overlapping the region are drawn, and
    each only inside the region, so a tile of a whole slide costs as much as the part
    of the objects in it, and any tiling of a slide gives the same pixels as one raster.
    """
    h, w = shape
    out = np.zeros((h, w), dtype)
    x0, y0 = origin
    region = (x0, y0, x0 + w * downsample, y0 + h * downsample)
    for position in annotations.indices_in(*region):
        index, ann = int(position) + 1, annotations[int(position)]
        box = _window(ann.bounds, origin, downsample, shape)
        if box is None:
            continue
        cx0, cy0, cx1, cy1 = box
        mask = np.zeros((cy1 - cy0, cx1 - cx0), bool)
        for part in ann.polygons():  # each part filled in its own window: many small parts cost their own size
            window = _window(part.bounds, origin, downsample, shape)
            if window is None:
                continue
            px0, py0, px1, py1 = window
            rings = [np.asarray(r.coords, np.float64) for r in (part.exterior, *part.interiors)]
            size = (py1 - py0, px1 - px0)
            mask[py0 - cy0 : py1 - cy0, px0 - cx0 : px1 - cx0] |= _closed_fill(
                *_edges(rings, origin, downsample, (px0, py0), size[0]), size
            )
        value = index if values == "instance" else annotations.class_id(ann.label)
        np.copyto(out[cy0:cy1, cx0:cx1], value, where=mask, casting="unsafe")
    return out


def _window(bounds, origin, downsample: float, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The raster pixels (x0, y0, x1, y1) whose centres a level-0 bounding box can hold, clipped to `shape`."""
    x0, y0 = origin
    bx0, by0, bx1, by1 = ((b - o) / downsample - 0.5 for b, o in zip(bounds, (x0, y0, x0, y0), strict=True))
    cx0, cy0 = max(0, int(np.floor(bx0))), max(0, int(np.floor(by0)))
    cx1, cy1 = min(shape[1], int(np.ceil(bx1)) + 1), min(shape[0], int(np.ceil(by1)) + 1)
    return None if cx1 <= cx0 or cy1 <= cy0 else (cx0, cy0, cx1, cy1)


def _centres(coords, origin, downsample, crop) -> np.ndarray:
    """(x, y) vertices in a crop's pixel units, pixel centres at whole numbers."""
    return (np.asarray(coords, np.float64) - origin) / downsample - 0.5 - crop


def _edges(rings: list[np.ndarray], origin, downsample: float, crop, rows: int):
    """The edges (ax, ay, bx, by, is a hole's) of a polygon's rings in crop pixel units.

    Of a long outline only the edges that can reach the crop's rows are kept (a
    pixel's margin either side), so a tile of a huge polygon costs its share of it.
    """
    lo, hi = origin[1] + (crop[1] - 1) * downsample, origin[1] + (crop[1] + rows + 1) * downsample
    starts, ends, holes = [], [], []
    for k, ring in enumerate(rings):
        a, b = ring[:-1], ring[1:]  # shapely's rings are closed
        if len(a) > 64:
            keep = (np.maximum(a[:, 1], b[:, 1]) >= lo) & (np.minimum(a[:, 1], b[:, 1]) <= hi)
            a, b = a[keep], b[keep]
        starts.append(_centres(a, origin, downsample, crop))
        ends.append(_centres(b, origin, downsample, crop))
        holes.append(np.full(len(a), k > 0))
    a, b = np.concatenate(starts), np.concatenate(ends)
    return a[:, 0], a[:, 1], b[:, 0], b[:, 1], np.concatenate(holes)


def _closed_fill(ax, ay, bx, by, hole, shape: tuple[int, int]) -> np.ndarray:
    """Pixels of `shape` whose centre lies inside the polygon of these edges (even-odd) or on one of them.

    A scan line per pixel row: the rows each edge crosses come from its end points
    alone, so the cost is the rings' length plus the pixels, not their product. An
    edge counts for rows y with min(y0, y1) <= y < max(y0, y1) (the ray-crossing
    rule); between the 1st and 2nd, 3rd and 4th... crossing of a row lies the inside.
    Centres on a ring (on an edge, a vertex, a horizontal edge) are added, so a
    hole's edge belongs to the object around it. The exterior and holes of one
    polygon are scanned together: a hole's inside is an even count. Edges of holes
    are marked in `hole`.
    """
    h, w = shape
    diff = np.zeros((h, w + 1), np.int16)  # +1 where a run starts, -1 after it ends (runs barely overlap)
    # crossings: rows ceil(min y) .. ceil(max y) - 1 of each slanted edge, inside the crop
    low, high = np.minimum(ay, by), np.maximum(ay, by)
    first = np.clip(np.ceil(low), 0, h).astype(np.int64)
    stop = np.clip(np.ceil(high), 0, h).astype(np.int64)
    live = np.flatnonzero(stop > first)
    for r0, r1 in _bands(first[live], stop[live], h):  # bands of rows with a bounded number of crossings
        edges = live[(first[live] < r1) & (stop[live] > r0)]
        start, end = np.maximum(first[edges], r0), np.minimum(stop[edges], r1)
        counts = end - start
        which = np.repeat(edges, counts)
        rows = np.repeat(start, counts) + np.arange(len(which)) - np.repeat(np.cumsum(counts) - counts, counts)
        xs = ax[which] + (rows - ay[which]) * (bx[which] - ax[which]) / (by[which] - ay[which])
        _settle_ties(xs, rows, ax[which], ay[which], bx[which], by[which], hole[which])
        order = np.lexsort((xs, rows))
        rows, xs = rows[order][0::2], xs[order]
        _add_runs(diff, rows, np.ceil(xs[0::2]), np.floor(xs[1::2]), w)
    # centres on the rings that the crossings miss: horizontal edges on a row, and vertices
    flat = (ay == by) & (ay == np.round(ay)) & (ay >= 0) & (ay < h)
    if flat.any():
        lo, hi = np.minimum(ax[flat], bx[flat]), np.maximum(ax[flat], bx[flat])
        _add_runs(diff, ay[flat].astype(np.int64), np.ceil(lo), np.floor(hi), w)
    mask = np.cumsum(diff[:, :w], axis=1, dtype=np.int16) > 0
    vx, vy = np.round(ax), np.round(ay)
    tolerance = np.where(hole, 0.0, 1e-12)  # the point-in-polygon test's tolerance; holes: exact, as shapely
    on = (np.abs(ax - vx) <= tolerance) & (np.abs(ay - vy) <= tolerance)
    on &= (vx >= 0) & (vx < w) & (vy >= 0) & (vy < h)
    mask[vy[on].astype(np.intp), vx[on].astype(np.intp)] = True
    return mask


MAX_CROSSINGS = 1 << 20  # edge-row crossings computed at once (tens of MB)


def _bands(first: np.ndarray, stop: np.ndarray, h: int) -> list[tuple[int, int]]:
    """Consecutive row ranges covering the crossed rows, each crossed at most ~MAX_CROSSINGS times.

    A polygon of many long, thin spikes crosses each row thousands of times; cutting
    the rows into bands keeps the crossings held at once bounded (one row is never cut).
    """
    if first.size == 0:
        return []
    per_row = np.zeros(h + 1, np.int64)
    np.add.at(per_row, first, 1)
    np.add.at(per_row, stop, -1)
    total = np.cumsum(np.cumsum(per_row[:h]))  # crossings in rows 0..r
    top, low = int(stop.max()), int(first.min())
    if total[-1] <= MAX_CROSSINGS:
        return [(low, top)]
    cuts = np.unique(np.searchsorted(total, np.arange(MAX_CROSSINGS, total[-1], MAX_CROSSINGS), side="right"))
    bounds = [low, *(int(c) for c in cuts if low < c < top), top]
    return list(pairwise(bounds))


def _settle_ties(xs, rows, ax, ay, bx, by, hole) -> None:
    """Decide crossings within rounding of a pixel centre as the per-pixel tests used before did.

    Only on which side of each centre a crossing lies matters, so a crossing that is
    at most a rounding error from centre c is moved to c (on the edge) or to c -/+ 1/4.
    The side is the sign of the edge's intercept computed from c itself, the ray-crossing
    test (O'Rourke) that skimage.draw.polygon applies to each pixel, for outer rings; for
    holes it is the exact orientation of c to the edge, as shapely's `contains` decides.
    """
    centre = np.round(xs)
    near = np.flatnonzero(np.abs(xs - centre) < 1e-6)
    if near.size == 0:
        return
    c, r = centre[near], rows[near]
    x0, y0, x1, y1 = bx[near] - c, by[near] - r, ax[near] - c, ay[near] - r
    side = np.sign((x0 * y1 - x1 * y0) / (y1 - y0))
    in_hole = np.flatnonzero(hole[near])
    if in_hole.size:
        k = near[in_hole]
        side[in_hole] = _exact_side(ax[k], ay[k], bx[k], by[k], c[in_hole], r[in_hole])
    xs[near] = c + 0.25 * side


def _exact_side(ax, ay, bx, by, cx, cy) -> np.ndarray:
    """Sign of (x where edge a-b meets row cy) - cx, exact for the floats given (robust orientation)."""
    det = (ax - cx) * (by - cy) - (ay - cy) * (bx - cx)
    bound = 3.3307e-16 * (np.abs((ax - cx) * (by - cy)) + np.abs((ay - cy) * (bx - cx)))  # Shewchuk's orient2d
    sign = np.sign(det)
    for i in np.flatnonzero(np.abs(det) <= bound):  # too close to call in floating point: exact rationals
        px, py, qx, qy, ox, oy = (Fraction(float(v[i])) for v in (ax, ay, bx, by, cx, cy))
        exact = (px - ox) * (qy - oy) - (py - oy) * (qx - ox)
        sign[i] = int(exact > 0) - int(exact < 0)
    return sign * np.sign(by - ay)


def _add_runs(diff: np.ndarray, rows: np.ndarray, c0: np.ndarray, c1: np.ndarray, w: int) -> None:
    """Mark columns c0..c1 (inclusive, clipped to the crop) of each row in a difference image."""
    c0, c1 = np.maximum(c0, 0).astype(np.int64), np.minimum(c1, w - 1).astype(np.int64)
    keep = c0 <= c1
    rows, c0, c1 = rows[keep], c0[keep], c1[keep]
    np.add.at(diff, (rows, c0), 1)
    np.add.at(diff, (rows, c1 + 1), -1)


def vectorize(
    labels: np.ndarray,
    *,
    classes: Mapping[int, str] | np.ndarray | None = None,
    downsample: float = 1.0,
    origin: tuple[float, float] = (0.0, 0.0),
    object_type: str = "annotation",
    class_names: list[str] | None = None,
) -> AnnotationSet:
    """One Annotation per label id (holes kept, several parts allowed), in level-0 pixels.

    `classes` gives each instance its class: a mapping id -> name, or a raster of class
    ids the same shape as `labels` (the majority class under the object wins, named by
    `class_names[class_id - 1]`).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, not {labels.shape}")
    found = []
    for index, sl in enumerate(
        ndimage.find_objects(labels if labels.dtype.kind in "ui" else labels.astype(np.int64)), start=1
    ):
        if sl is None:
            continue
        crop = labels[sl] == index
        geometry = _mask_to_geometry(crop, (sl[1].start, sl[0].start), downsample, origin)
        if geometry is None:
            continue
        label = _class_of(index, crop, sl, classes, class_names)
        found.append(Annotation(geometry, label, object_type, {"id": index}))
    return AnnotationSet(found, classes=class_names)


def _class_of(index, crop, sl, classes, class_names) -> str:
    if classes is None:
        return UNCLASSIFIED
    if isinstance(classes, np.ndarray):
        ids = classes[sl][crop]
        cid = int(np.bincount(ids.astype(np.int64)).argmax()) if ids.size else 0
        if cid == 0:
            return UNCLASSIFIED
        return class_names[cid - 1] if class_names and cid <= len(class_names) else str(cid)
    return classes.get(index, UNCLASSIFIED)


def pixel_outline(mask: np.ndarray, *, scale: float = 1.0, origin: tuple[float, float] = (0.0, 0.0)):
    """The exact outline of a boolean mask's pixels, `scale` units per pixel, its corner at `origin`."""
    return _mask_to_geometry(mask, (0, 0), scale, origin)


def _mask_to_geometry(mask: np.ndarray, offset, downsample, origin) -> Polygon | MultiPolygon | None:
    """The exact outline of the mask's pixels (their edges, not their centres).

    Each row's runs of pixels become boxes and GEOS dissolves the shared edges, so
    thin lines, diagonal contacts and holes all survive, the result is always
    valid, and rasterizing it again gives back exactly the same pixels.
    """
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    step = np.diff(padded, axis=1)
    ys, xs = np.nonzero(step)  # row-major: each row's run starts and ends alternate
    kinds = step[ys, xs]
    starts, ends, rows = xs[kinds == 1], xs[kinds == -1], ys[kinds == 1]
    if rows.size == 0:
        return None
    ox, oy = offset
    boxes = shapely.box(starts + ox, rows + oy, ends + ox, rows + oy + 1)
    geometry = shapely.union_all(boxes).simplify(0)  # simplify(0) drops collinear vertices
    if downsample != 1 or origin != (0.0, 0.0):
        x0, y0 = origin
        geometry = shapely.transform(geometry, lambda xy: xy * downsample + (x0, y0))
    return as_area(geometry)


def vectorize_tiled(
    labels,
    *,
    classes: Mapping[int, str] | None = None,
    tile: int = 2048,
    downsample: float = 1.0,
    origin: tuple[float, float] = (0.0, 0.0),
    object_type: str = "annotation",
) -> AnnotationSet:
    """`vectorize` for label images too large for memory (a dask or zarr array), tile by tile.

    Outlines follow pixel edges, so an object's pieces from neighbouring tiles share
    edges exactly and their union is the object as `vectorize` would give it.
    """
    from collections import defaultdict

    height, width = labels.shape
    pieces: dict[int, list] = defaultdict(list)
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            block = labels[y : y + tile, x : x + tile]
            block = np.asarray(block.compute() if hasattr(block, "compute") else block)
            ids, compact = np.unique(block, return_inverse=True)
            if ids.size == 1 and ids[0] == 0:
                continue
            compact = compact.reshape(block.shape) + (0 if ids[0] == 0 else 1)
            ids = ids if ids[0] == 0 else np.concatenate([[0], ids])
            corner = (origin[0] + x * downsample, origin[1] + y * downsample)
            for ann in vectorize(compact, downsample=downsample, origin=corner):
                pieces[int(ids[ann.properties["id"]])].append(ann.geometry)
    names = list(dict.fromkeys((classes or {}).values()))
    found = []
    for index in sorted(pieces):
        geometry = as_area(shapely.union_all(pieces[index]).simplify(0))
        if geometry is not None:
            label = (classes or {}).get(index, UNCLASSIFIED)
            found.append(Annotation(geometry, label, object_type, {"id": index}))
    return AnnotationSet(found, classes=names or None)
