"""Glomeruli as objects: connected pieces of each class of a class-id label image (any size), or polygons.

An object is a 4-connected piece of one class, as the rest of the project counts
them (the run's summary, `class_objects` and so the GeoJSON export, Compare): a
label output and its own GeoJSON give the same report. Two glomeruli of different
classes that touch stay two.

A whole-slide label image at full resolution does not fit in memory, so pieces are
found block by block and those of one class that touch across a block edge are
joined: the same objects, areas and point hits as one labelling of the whole image,
in one block's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.measure import label as label_pieces

from ..evaluation.blockwise import read_block

BLOCK = 4096  # label pixels per block side: 16 Mpx, about 100 MB of working arrays


@dataclass
class Objects:
    """Objects found in a label image or a polygon set: per object its area and class value; per point its object."""

    areas_px: np.ndarray  # int64 label pixels (or float level-0 px² for polygons), one per object
    values: np.ndarray  # int64 class value of each object
    hits: np.ndarray | None = None  # per point: index of the object it falls in, -1 outside; None without points


def label_objects(labels, points: np.ndarray | None = None, *, block: int = BLOCK) -> Objects:
    """The 4-connected pieces of each non-zero class of a 2-D label array, ordered by their box's top-left corner.

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
    pairs: list[np.ndarray] = []  # pieces side by side across a block edge (joined if of one class)
    piece_values, piece_counts, piece_corners = [], [], []
    count = 0  # pieces so far; a piece's id is count + its local label
    above = np.zeros(width, np.int64)  # piece ids of the last row of the block row above
    for y0 in range(0, height, block):
        y1 = min(height, y0 + block)
        bottom = np.zeros(width, np.int64)
        left = None
        for x0 in range(0, width, block):
            x1 = min(width, x0 + block)
            tile = read_block(labels, y0, y1, x0, x1)
            local, n = label_pieces(tile, background=0, return_num=True, connectivity=1)
            ids = np.where(local > 0, local.astype(np.int64) + count, 0)
            if n:
                flat = local.ravel()
                values = np.zeros(n + 1, np.int64)
                values[flat] = tile.ravel()  # one class per piece
                piece_values.append(values[1:])
                piece_counts.append(np.bincount(flat, minlength=n + 1)[1:])
                boxes = ndimage.find_objects(local)
                piece_corners.append(np.array([(y0 + b[0].start, x0 + b[1].start) for b in boxes], np.int64))
            if left is not None:
                pairs.append(_touching(left, ids[:, 0]))
            if y0:
                pairs.append(_touching(above[x0:x1], ids[0]))
            if hits_piece is not None:
                tile_key = (y0 // block) * (-(-width // block)) + x0 // block
                a, b = np.searchsorted(key, [tile_key, tile_key + 1])
                sel = where[a:b]
                hits_piece[sel] = ids[row[sel] - y0, col[sel] - x0]
            left = ids[:, -1].copy()
            bottom[x0:x1] = ids[-1]
            count += n
        above = bottom
    if count == 0:
        hits = None if hits_piece is None else np.full(len(hits_piece), -1, np.int64)
        return Objects(np.zeros(0, np.int64), np.zeros(0, np.int64), hits)
    values, counts = np.concatenate(piece_values), np.concatenate(piece_counts)
    return _join(count, pairs, values, counts, np.concatenate(piece_corners), hits_piece)


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


def _touching(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 2) pieces side by side (4-connected) across an edge: a[i] next to b[i], both foreground."""
    both = (a > 0) & (b > 0)
    return np.stack([a[both], b[both]], axis=1)


def _join(count, pairs, values, counts, corners, hits_piece) -> Objects:
    """Pieces of one class that touch joined into objects, numbered by the top-left corner of their bounding box
    (topmost first, then leftmost), whatever the blocks were."""
    edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    edges = edges[values[edges[:, 0] - 1] == values[edges[:, 1] - 1]]  # classes never join
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0] - 1, edges[:, 1] - 1)), shape=(count, count))
    n, component = connected_components(graph, directed=False)
    top, left = np.full(n, np.iinfo(np.int64).max), np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(top, component, corners[:, 0])
    np.minimum.at(left, component, corners[:, 1])
    rank = np.empty(n, np.int64)
    rank[np.lexsort((left, top))] = np.arange(n)  # ties (one corner, two objects) keep the found order
    component = rank[component]
    areas = np.bincount(component, weights=counts, minlength=n).astype(np.int64)
    object_values = np.zeros(n, np.int64)
    object_values[component] = values
    hits = None
    if hits_piece is not None:
        hits = np.where(hits_piece > 0, component[np.maximum(hits_piece, 1) - 1], -1).astype(np.int64)
    return Objects(areas, object_values, hits)
