"""napari layer data <-> annotations, as plain data (no napari import).

A layer's data lives in its own pixel grid; its `scale` and `translate` place it in
the world, which for a slide is micrometres. Annotations are in level-0 pixels of
the slide, so a layer pixel is `scale / slide_mpp` level-0 pixels. Without a known
slide pixel size the world is taken to be level-0 pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon

from ..annotations import Annotation, AnnotationSet, vectorize, vectorize_tiled
from ..annotations.model import UNCLASSIFIED, as_area

LARGE = 4096 * 4096  # label layers above this many pixels are vectorized tile by tile
ELLIPSE_VERTICES = 64


def finest_level(data):
    """Level 0 of a multiscale layer's data, or the data itself."""
    return data[0] if isinstance(data, Sequence) else data


def to_level0(meta: dict[str, Any], slide_mpp: float | None) -> tuple[float, tuple[float, float]]:
    """(level-0 pixels per layer pixel, level-0 (x, y) of the layer's origin)."""
    scale = np.asarray(meta.get("scale", (1.0, 1.0)), float)[-2:]
    translate = np.asarray(meta.get("translate", (0.0, 0.0)), float)[-2:]
    base = slide_mpp or 1.0
    return float(scale[-1] / base), (float(translate[-1] / base), float(translate[-2] / base))


def label_classes(meta: dict[str, Any]) -> dict[int, str]:
    """Label value -> class, from layer metadata {"classes": {...}} or features with "index" and "class"."""
    classes = (meta.get("metadata") or {}).get("classes")
    if isinstance(classes, dict):
        return {int(k): str(v) for k, v in classes.items()}
    features = meta.get("features")
    if features is not None and len(features) and {"index", "class"} <= set(features.columns):
        return {int(i): str(c) for i, c in zip(features["index"], features["class"], strict=True) if int(i) > 0}
    return {}


def labels_to_annotations(data, meta: dict[str, Any], slide_mpp: float | None = None) -> AnnotationSet:
    """Every label value of a Labels layer (its finest level) as a polygon in level-0 pixels."""
    array = finest_level(data)
    downsample, origin = to_level0(meta, slide_mpp)
    classes = label_classes(meta)
    if array.ndim != 2:
        raise ValueError(f"only 2-D label layers can be saved as polygons, this one has shape {array.shape}")
    if np.prod(array.shape) > LARGE or hasattr(array, "compute"):
        return vectorize_tiled(array, classes=classes, downsample=downsample, origin=origin)
    names = list(dict.fromkeys(classes.values())) or None
    return vectorize(
        np.asarray(array), classes=classes or None, downsample=downsample, origin=origin, class_names=names
    )


def shapes_to_annotations(data, meta: dict[str, Any], slide_mpp: float | None = None) -> AnnotationSet:
    """Polygons, rectangles and ellipses of a Shapes layer in level-0 pixels; lines and paths are skipped.

    Shapes sharing an "object" feature (as the annotation reader makes them from
    multi-part objects) become one object again; the "class" feature names the class.
    """
    downsample, (ox, oy) = to_level0(meta, slide_mpp)
    types = meta.get("shape_type") or ["polygon"] * len(data)
    features = meta.get("features")
    labels = _column(features, "class", len(data))
    objects = _column(features, "object", len(data))
    groups: dict[Any, list] = {}
    classes: dict[Any, str] = {}
    warnings = []
    for i, (points, kind) in enumerate(zip(data, types, strict=True)):
        yx = np.asarray(points, float)[:, -2:]
        xy = np.column_stack([yx[:, 1] * downsample + ox, yx[:, 0] * downsample + oy])
        if kind == "ellipse":
            xy = _ellipse(xy)
        elif kind not in ("polygon", "rectangle"):
            warnings.append(f"shape {i}: {kind} skipped, not an area")
            continue
        poly = as_area(Polygon(xy).buffer(0)) if len(xy) >= 3 else None
        if poly is None:
            warnings.append(f"shape {i}: no area, skipped")
            continue
        key = objects[i] if objects[i] is not None else f"shape {i}"
        groups.setdefault(key, []).append(poly)
        classes[key] = labels[i] or UNCLASSIFIED
    found = []
    for key, parts in groups.items():
        geometry = as_area(shapely.union_all(parts)) if len(parts) > 1 else parts[0]
        found.append(Annotation(geometry, classes[key], "annotation"))
    known = (meta.get("metadata") or {}).get("classes")
    return AnnotationSet(found, classes=known if isinstance(known, list) else None, warnings=warnings)


def _column(features, name: str, n: int) -> list:
    if features is None or name not in getattr(features, "columns", ()):
        return [None] * n
    return [None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in features[name]]


def _ellipse(corners: np.ndarray) -> np.ndarray:
    """napari stores an ellipse as the four corners of its (possibly rotated) bounding box."""
    centre = corners.mean(axis=0)
    half_u, half_v = (corners[1] - corners[0]) / 2, (corners[3] - corners[0]) / 2
    t = np.linspace(0, 2 * np.pi, ELLIPSE_VERTICES, endpoint=False)[:, None]
    return centre + np.cos(t) * half_u + np.sin(t) * half_v
