"""napari writer contributions: Labels and Shapes layers to GeoJSON, COCO, ImageScope XML, OME-Zarr and TIFF.

Polygons are written in level-0 pixels of the slide shown in the viewer (so QuPath
places them on the same slide); label images keep the layer's own grid and record
its pixel size. A failed write is one notification line and leaves no file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..annotations import (
    AnnotationError,
    AnnotationSet,
    ArrayLabels,
    PolygonLabels,
    write_coco,
    write_geojson,
    write_imagescope_xml,
    write_label_tiff,
    write_label_zarr,
)
from . import reading
from .layer_annotations import finest_level, label_classes, labels_to_annotations, shapes_to_annotations, to_level0


def write_labels_geojson(path: str, data: Any, meta: dict) -> list[str]:
    return _guarded(path, lambda: write_geojson(_labels(data, meta), path, overwrite=True))


def write_labels_coco(path: str, data: Any, meta: dict) -> list[str]:
    return _guarded(path, lambda: _coco(_labels(data, meta), path, meta, _labels_shape(data, meta)))


def write_labels_xml(path: str, data: Any, meta: dict) -> list[str]:
    return _guarded(path, lambda: write_imagescope_xml(_labels(data, meta), path, mpp=_slide_mpp(), overwrite=True))


def write_labels_zarr(path: str, data: Any, meta: dict) -> list[str]:
    return _guarded(
        path, lambda: write_label_zarr(_label_source(data, meta), path, mpp=_layer_mpp(meta), overwrite=True)
    )


def write_labels_tiff(path: str, data: Any, meta: dict) -> list[str]:
    return _guarded(
        path, lambda: write_label_tiff(_label_source(data, meta), path, mpp=_layer_mpp(meta), overwrite=True)
    )


def write_shapes_geojson(path: str, data: Any, meta: dict) -> list[str]:
    return _guarded(path, lambda: write_geojson(_shapes(data, meta), path, overwrite=True))


def write_shapes_coco(path: str, data: Any, meta: dict) -> list[str]:
    return _guarded(path, lambda: _coco((found := _shapes(data, meta)), path, meta, _image_shape(found)))


def write_shapes_xml(path: str, data: Any, meta: dict) -> list[str]:
    return _guarded(path, lambda: write_imagescope_xml(_shapes(data, meta), path, mpp=_slide_mpp(), overwrite=True))


def write_shapes_zarr(path: str, data: Any, meta: dict) -> list[str]:
    return _guarded(path, lambda: _shapes_raster(write_label_zarr, data, meta, path))


def write_shapes_tiff(path: str, data: Any, meta: dict) -> list[str]:
    return _guarded(path, lambda: _shapes_raster(write_label_tiff, data, meta, path))


def _guarded(path: str, write) -> list[str]:
    """napari asks before replacing a file, so writers may overwrite; a failure is one line."""
    try:
        write()
    except (AnnotationError, ValueError) as exc:
        reading.notify(f"{Path(path).name}: not saved: {exc}")
        return []
    return [path]


def _labels(data, meta) -> AnnotationSet:
    return labels_to_annotations(data, meta, _slide_mpp())


def _shapes(data, meta) -> AnnotationSet:
    return shapes_to_annotations(data, meta, _slide_mpp())


def _label_source(data, meta) -> ArrayLabels:
    array = finest_level(data)
    return ArrayLabels(array, label_classes(meta))


def _shapes_raster(writer, data, meta, path):
    found = _shapes(data, meta)
    mpp = _slide_mpp()
    return writer(PolygonLabels(found, _image_shape(found)), path, mpp=mpp, overwrite=True)


def _coco(found: AnnotationSet, path: str, meta: dict, shape: tuple[int, int]):
    name = _slide_name() or f"{meta.get('name', 'image')}.png"
    return write_coco({name: (found, shape)}, path, overwrite=True)


def _labels_shape(data, meta) -> tuple[int, int]:
    """The labels' extent in level-0 pixels, or the slide's when one is shown."""
    slide = _slide()
    if slide is not None:
        return tuple(slide.level_shapes[0])
    array = finest_level(data)
    downsample, (ox, oy) = to_level0(meta, _slide_mpp())
    return (int(np.ceil(array.shape[-2] * downsample + oy)), int(np.ceil(array.shape[-1] * downsample + ox)))


def _image_shape(found: AnnotationSet) -> tuple[int, int]:
    """The slide's level-0 size; without a slide, enough to hold every object from (0, 0)."""
    slide = _slide()
    if slide is not None:
        return tuple(slide.level_shapes[0])
    if not len(found):
        raise ValueError("no shapes with an area to save")
    x1 = max(a.bounds[2] for a in found)
    y1 = max(a.bounds[3] for a in found)
    return (int(np.ceil(y1)), int(np.ceil(x1)))


def _layer_mpp(meta) -> float | None:
    units = [str(u) for u in (meta.get("units") or ())]
    if units and all(u in ("um", "micrometer", "µm") for u in units):
        return float(np.asarray(meta["scale"])[-1])
    return None


def _slide_mpp() -> float | None:
    slide = _slide()
    return slide.mpp if slide is not None else None


def _slide_name() -> str | None:
    slide = _slide()
    return slide.source.name if slide is not None else None


def _slide():
    """The Slide of the one slide layer in the current viewer, if there is exactly one."""
    layer = reading.current_slide_layer()
    return None if layer is None else layer.metadata["slide"]
