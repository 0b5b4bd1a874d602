"""Glomeruli as objects: connected pieces of a class-id label image (any size), or polygons.

A whole-slide label image at full resolution does not fit in memory, so objects are
found block by block and the pieces that touch across a block edge are joined
(union of the labels on both sides of every edge): the same objects, areas and
point hits as one `ndimage.label` over the whole image, in one block's memory.
An object's class is the class most of its pixels have (a segmentally sclerosed
glomerulus painted partly "normal" is still one glomerulus).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

EIGHT = np.ones((3, 3), bool)  # objects are 8-connected, as the engine's object rules make them
BLOCK = 4096  # label pixels per block side: 16 Mpx, about 100 MB of working arrays


@dataclass
class Objects:
    """Objects found in a label image or a polygon set: per object its area and class value; per point its object."""

    areas_px: np.ndarray  # int64 label pixels (or float level-0 px² for polygons), one per object
    values: np.ndarray  # int64 class value of each object (majority of its pixels)
    hits: np.ndarray | None = None  # per point: index of the object it falls in, -1 outside; None without points


def label_objects(labels, points: np.ndarray | None = None, *, block: int = BLOCK) -> Objects:
    """Connected foreground objects (any non-zero class, 8-connected) of a 2-D label array.

    `labels`: numpy, dask or zarr; read one `block`-sided square at a time. `points`:
    (n, 2) x, y positions in label pixels (pixel (i, j) spans x in [j, j + 1)), to tell
    which object each falls in.
    """
    height, width = (int(s) for s in labels.shape)
    pts = None if points is None else np.asarray(points, np.float64).reshape(-1, 2)
    hits_piece = None if pts is None else np.zeros(len(pts), np.int64)  # piece id per point, 0: background
    if pts is not None:
        col, row = np.floor(pts[:, 0]).astype(np.int64), np.floor(pts[:, 1]).astype(np.int64)
        on = (col >= 0) & (col < width) & (row >= 0) & (row < height)
        where = np.flatnonzero(on)
        key = (row[where] // block) * (-(-width // block)) + col[where] // block
        order = np.argsort(key, kind="stable")
        where, key = where[order], key[order]
    pairs: list[np.ndarray] = []  # pieces touching across a block edge
    piece_ids, piece_values, piece_counts, piece_corners = [], [], [], []
    count = 0  # pieces so far; a piece's id is count + its local label
    above = np.zeros(width, np.int64)  # piece ids of the last row of the block row above
    for y0 in range(0, height, block):
        y1 = min(height, y0 + block)
        bottom = np.zeros(width, np.int64)
        left = None
        for x0 in range(0, width, block):
            x1 = min(width, x0 + block)
            tile = _read(labels, y0, y1, x0, x1)
            local, n = ndimage.label(tile > 0, EIGHT)
            ids = np.where(local > 0, local.astype(np.int64) + count, 0)
            if n:
                boxes = ndimage.find_objects(local)
                piece_corners.append([(y0 + b[0].start, x0 + b[1].start) for b in boxes])
                fg = ids > 0
                key_pv = ids[fg] * 2**32 + tile[fg].astype(np.int64)
                keys, counts = np.unique(key_pv, return_counts=True)
                piece_ids.append(keys >> 32)
                piece_values.append(keys & (2**32 - 1))
                piece_counts.append(counts)
            if left is not None:
                pairs.append(_touching(left, ids[:, 0]))
            if y0:
                pairs.append(_touching(above[max(0, x0 - 1) : x1 + 1], ids[0], shift=x0 - max(0, x0 - 1)))
            if hits_piece is not None:
                tile_key = (y0 // block) * (-(-width // block)) + x0 // block
                a, b = np.searchsorted(key, [tile_key, tile_key + 1])
                sel = where[a:b]
                hits_piece[sel] = ids[row[sel] - y0, col[sel] - x0]
            left = ids[:, -1].copy()
            bottom[x0:x1] = ids[-1]
            count += n
        above = bottom
    corners = np.concatenate([np.asarray(c, np.int64).reshape(-1, 2) for c in piece_corners]) if count else None
    return _join(count, pairs, piece_ids, piece_values, piece_counts, corners, hits_piece)


def polygon_objects(geometries: list, points: np.ndarray | None = None) -> Objects:
    """Polygons as objects (areas in the polygons' px²); `points` (n, 2) in the same coordinates."""
    import shapely

    areas = np.array([g.area for g in geometries], np.float64)
    hits = None
    if points is not None:
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        hits = np.full(len(pts), -1, np.int64)
        if len(pts) and geometries:
            tree = shapely.STRtree(geometries)
            point_index, object_index = tree.query(shapely.points(pts), predicate="intersects")
            order = np.lexsort((object_index, point_index))  # the first object in file order wins an overlap
            point_index, object_index = point_index[order], object_index[order]
            first = np.unique(point_index, return_index=True)[1]
            hits[point_index[first]] = object_index[first]
    return Objects(areas, np.zeros(len(geometries), np.int64), hits)


def _read(labels, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    block = labels[y0:y1, x0:x1]
    return np.asarray(block.compute() if hasattr(block, "compute") else block)


def _touching(a: np.ndarray, b: np.ndarray, shift: int = 0) -> np.ndarray:
    """(n, 2) piece pairs that touch (8-connected) across an edge: a[i + shift + s] next to b[i], s in -1, 0, 1."""
    found = []
    for s in (-1, 0, 1):
        start = shift + s
        lo, hi = max(0, -start), min(len(b), len(a) - start)
        if hi <= lo:
            continue
        x, y = a[lo + start : hi + start], b[lo:hi]
        both = (x > 0) & (y > 0)
        found.append(np.stack([x[both], y[both]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), np.int64)


def _join(count, pairs, piece_ids, piece_values, piece_counts, corners, hits_piece) -> Objects:
    """Pieces joined into objects, numbered by the top-left corner of their bounding box (whatever the
    blocks were); each object's majority class."""
    if count == 0:
        hits = None if hits_piece is None else np.full(len(hits_piece), -1, np.int64)
        return Objects(np.zeros(0, np.int64), np.zeros(0, np.int64), hits)
    edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0] - 1, edges[:, 1] - 1)), shape=(count, count))
    n, component = connected_components(graph, directed=False)
    top, left = np.full(n, np.iinfo(np.int64).max), np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(top, component, corners[:, 0])
    np.minimum.at(left, component, corners[:, 1])
    rank = np.empty(n, np.int64)
    rank[np.lexsort((left, top))] = np.arange(n)
    component = rank[component]
    ids, values, counts = (np.concatenate(x) for x in (piece_ids, piece_values, piece_counts))
    owner = component[ids - 1].astype(np.int64)
    areas = np.bincount(owner, weights=counts, minlength=n).astype(np.int64)
    # majority class: per (object, value) pixel totals, the largest per object (ties: the lower value)
    keys, inverse = np.unique(owner * 2**32 + values, return_inverse=True)
    totals = np.bincount(inverse, weights=counts)
    objects, vals = keys >> 32, keys & (2**32 - 1)
    order = np.lexsort((vals, -totals, objects))
    first = np.unique(objects[order], return_index=True)[1]
    majority = np.zeros(n, np.int64)
    majority[objects[order][first]] = vals[order][first]
    hits = None
    if hits_piece is not None:
        hits = np.where(hits_piece > 0, component[np.maximum(hits_piece, 1) - 1], -1).astype(np.int64)
    return Objects(areas, majority, hits)
