"""napari reader contribution for annotation files: polygons become a Shapes layer aligned with the slide.

Coordinates in these files are level-0 pixels. When the viewer shows a slide, the
layer takes that slide's scale, so the outlines sit on the tissue in micrometres.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..annotations import AnnotationError, AnnotationSet, read_annotations
from ..annotations.colors import class_color
from ..annotations.labeltiff import is_label_tiff, read_label_tiff_pyramid
from ..annotations.omezarr import LabelPyramid, read_label_zarr
from .reading import LayerData, as_paths, current_slide_layer, notify, read_each

VECTOR_SUFFIXES = (".geojson", ".json", ".xml")


def get_annotation_reader(path: str | list[str]):
    paths = as_paths(path)
    if not paths or not all(str(p).lower().endswith(VECTOR_SUFFIXES) for p in paths):
        return None
    return read_annotation_files


def read_annotation_files(path: str | list[str]) -> list[LayerData]:
    return read_each(path, _read_one, (AnnotationError,))


def _read_one(path) -> list[LayerData]:
    annotations = read_annotations(path)
    for warning in annotations.warnings[:5]:
        notify(f"{Path(path).name}: {warning}", error=False)
    return [shapes_layer_data(annotations, Path(path).name, scale=_slide_scale())]


def shapes_layer_data(annotations: AnnotationSet, name: str, scale=None) -> LayerData:
    """Polygon outlines in (y, x) level-0 pixels, one shape per polygon part, class as a feature."""
    data, labels, ids = [], [], []
    for index, ann in enumerate(annotations, start=1):
        for poly in ann.polygons():
            data.append(np.asarray(poly.exterior.coords)[:-1, ::-1])
            labels.append(ann.label)
            ids.append(index)
    colors = [np.array([*class_color(label), 255]) / 255 for label in labels]
    kwargs = {
        "name": name,
        "shape_type": "polygon",
        "features": {"class": labels, "object": ids},
        "edge_color": colors if colors else "yellow",
        "face_color": "transparent",
        "edge_width": 2,
        "metadata": {"classes": annotations.classes},
    }
    if scale is not None:
        kwargs.update(scale=scale[0], units=scale[1])
    return (data, kwargs, "shapes")


def get_labels_reader(path: str | list[str]):
    """Claim OME-Zarr label images and label TIFFs written by napari-nephro."""
    paths = as_paths(path)
    if not paths or not all(_is_labels(p) for p in paths):
        return None
    return read_label_files


def _is_labels(path) -> bool:
    path = Path(path)
    if path.suffix.lower() == ".zarr":
        return path.is_dir()
    return is_label_tiff(path)


def read_label_files(path: str | list[str]) -> list[LayerData]:
    return read_each(path, _read_labels, (AnnotationError,))


def _read_labels(path) -> list[LayerData]:
    path = Path(path)
    pyramid = read_label_zarr(path) if path.suffix.lower() == ".zarr" else read_label_tiff_pyramid(path)
    return [labels_layer_data(pyramid, path.name, _slide_scale())]


def labels_layer_data(pyramid: LabelPyramid, name: str, slide_scale=None) -> LayerData:
    """A (multiscale) Labels layer: in micrometres when the file knows its pixel size, else on the slide's scale.

    A result written at the model's scale (a pixel of d slide pixels) is shifted by
    (d - 1) / 2 slide pixels: napari places a pixel by its centre, and the centre of
    a coarse pixel is not the centre of the first slide pixel it covers.
    """
    kwargs = {"name": name, "metadata": {"classes": pyramid.classes}}
    d = pyramid.slide_downsample
    if pyramid.mpp is not None:
        kwargs.update(scale=(pyramid.mpp, pyramid.mpp), units=("um", "um"))
        slide_mpp = pyramid.mpp / d
        if pyramid.slide_shape is None and slide_scale is not None and str(slide_scale[1][-1]) in ("um", "micrometer"):
            slide_mpp = float(slide_scale[0][-1])  # no run record: the slide on screen says how coarse this is
            d = pyramid.mpp / slide_mpp
    elif slide_scale is not None:
        slide_mpp = float(slide_scale[0][-1])
        kwargs.update(scale=tuple(float(s) * d for s in slide_scale[0]), units=slide_scale[1])
    else:
        slide_mpp = 1.0
    if abs(d - 1) > 1e-6 and "scale" in kwargs:
        shift = (d - 1) / 2 * slide_mpp
        kwargs["translate"] = (shift, shift)
    if pyramid.classes:
        values = sorted(pyramid.classes)
        kwargs["features"] = {"index": values, "class": [pyramid.classes[v] for v in values]}
    data = pyramid.levels if len(pyramid.levels) > 1 else pyramid.levels[0]
    kwargs["multiscale"] = len(pyramid.levels) > 1
    return (data, kwargs, "labels")


def _slide_scale():
    """The scale and units of the one slide layer in the current viewer, if there is exactly one."""
    layer = current_slide_layer()
    if layer is None:
        return None
    return tuple(layer.scale), tuple(str(u) for u in layer.units)
