"""Polygons <-> label rasters, at any pyramid level and for any region, without a level-0 raster.

A pixel belongs to a polygon when its centre is inside it or on its edge (and not
strictly inside a hole). Pixel (row i, column j) of a level with downsample `ds`
whose region starts at level-0 (x0, y0) covers level-0 [j * ds + x0, (j + 1) * ds + x0]
and has its centre half a pixel in; outlines made from pixels follow pixel edges.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon
from skimage.draw import polygon as draw_polygon

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
    (`annotations.class_id(label)`). Only objects overlapping the region are drawn, so
    a tile of a whole slide costs as much as the objects in it.
    """
    h, w = shape
    out = np.zeros((h, w), dtype)
    x0, y0 = origin
    region = (x0, y0, x0 + w * downsample, y0 + h * downsample)
    for position in annotations.indices_in(*region):
        index, ann = int(position) + 1, annotations[int(position)]
        bx0, by0, bx1, by1 = ((b - o) / downsample - 0.5 for b, o in zip(ann.bounds, (x0, y0, x0, y0), strict=True))
        cx0, cy0 = max(0, int(np.floor(bx0))), max(0, int(np.floor(by0)))
        cx1, cy1 = min(w, int(np.ceil(bx1)) + 1), min(h, int(np.ceil(by1)) + 1)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        mask = np.zeros((cy1 - cy0, cx1 - cx0), np.uint8)
        for poly in ann.polygons():
            _fill(mask, poly.exterior.coords, (x0, y0), downsample, (cx0, cy0), 1)
            for hole in poly.interiors:
                _fill(mask, hole.coords, (x0, y0), downsample, (cx0, cy0), 0, hole=True)
        value = index if values == "instance" else annotations.class_id(ann.label)
        out[cy0:cy1, cx0:cx1][mask.astype(bool)] = value
    return out


def _fill(mask, coords, origin, downsample, crop, value, hole: bool = False) -> None:
    """Set pixels whose centre lies in the closed ring, or strictly inside it for a hole."""
    pts = (np.asarray(coords, np.float64) - origin) / downsample - 0.5 - crop  # (x, y) of pixel centres
    rr, cc = draw_polygon(pts[:, 1], pts[:, 0], mask.shape)  # closed: centres on an edge count
    if hole:  # a hole's edge belongs to the object around it
        inside = shapely.contains_xy(Polygon(pts), cc.astype(np.float64), rr.astype(np.float64))
        rr, cc = rr[inside], cc[inside]
    mask[rr, cc] = value


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
