"""napari reader contribution for annotation files: polygons become a Shapes layer aligned with the slide.

Coordinates in these files are level-0 pixels. When the viewer shows a slide, the
layer takes that slide's scale, so the outlines sit on the tissue in micrometres.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .annotations import AnnotationError, AnnotationSet, read_annotations
from .annotations.colors import class_color

VECTOR_SUFFIXES = (".geojson", ".json")


def get_annotation_reader(path: str | list[str]):
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(str(p).lower().endswith(VECTOR_SUFFIXES) for p in paths):
        return None
    return read_annotation_files


def read_annotation_files(path: str | list[str]) -> list[tuple[Any, dict, str]]:
    paths = [path] if isinstance(path, str | Path) else list(path)
    layers = []
    for p in paths:
        try:
            annotations = read_annotations(p)
        except AnnotationError as exc:
            _notify(str(exc))
            continue
        for warning in annotations.warnings[:5]:
            _notify(f"{Path(p).name}: {warning}", error=False)
        layers.append(shapes_layer_data(annotations, Path(p).name, scale=_slide_scale()))
    return layers or [(None,)]


def shapes_layer_data(annotations: AnnotationSet, name: str, scale=None) -> tuple[list, dict, str]:
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


def _slide_scale():
    """The scale and units of the one slide layer in the current viewer, if there is exactly one."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:
        return None
    if viewer is None:
        return None
    slides = [layer for layer in viewer.layers if "slide" in layer.metadata]
    if len(slides) != 1:
        return None
    return tuple(slides[0].scale), tuple(str(u) for u in slides[0].units)


def _notify(message: str, error: bool = True) -> None:
    from napari.utils.notifications import show_error, show_warning

    (show_error if error else show_warning)(message)
