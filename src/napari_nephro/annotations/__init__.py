"""Annotations as users exchange them: polygons with class names <-> label rasters.

Coordinates are level-0 pixels with (0, 0) at the top-left corner of the top-left
pixel, as QuPath, COCO and ImageScope write them. Nothing here imports napari.
"""

from .coco import read_coco, write_coco
from .errors import AnnotationError
from .geojson import read_geojson, write_geojson
from .imagescope import read_xml_annotations, write_imagescope_xml
from .io import LabelFile, read_annotations, read_label_file, read_label_image
from .label_source import ArrayLabels, PolygonLabels
from .labeltiff import write_label_tiff
from .model import Annotation, AnnotationSet
from .omezarr import LabelPyramid, read_label_zarr, write_label_zarr
from .raster import rasterize, vectorize, vectorize_tiled

__all__ = [
    "Annotation",
    "AnnotationError",
    "AnnotationSet",
    "ArrayLabels",
    "LabelFile",
    "LabelPyramid",
    "PolygonLabels",
    "rasterize",
    "read_annotations",
    "read_coco",
    "read_geojson",
    "read_label_file",
    "read_label_image",
    "read_label_zarr",
    "read_xml_annotations",
    "vectorize",
    "vectorize_tiled",
    "write_coco",
    "write_geojson",
    "write_imagescope_xml",
    "write_label_tiff",
    "write_label_zarr",
]
