"""Annotations as users exchange them: polygons with class names <-> label rasters.

Coordinates are level-0 pixels with (0, 0) at the top-left corner of the top-left
pixel, as QuPath, COCO and ImageScope write them. Nothing here imports napari.
"""

from .coco import read_coco, write_coco
from .errors import AnnotationError
from .geojson import read_geojson, write_geojson
from .io import read_annotations
from .model import Annotation, AnnotationSet
from .raster import rasterize, vectorize

__all__ = [
    "Annotation",
    "AnnotationError",
    "AnnotationSet",
    "rasterize",
    "read_annotations",
    "read_coco",
    "read_geojson",
    "vectorize",
    "write_coco",
    "write_geojson",
]
