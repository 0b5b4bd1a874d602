"""Loading an annotation JSON file once, with one-line errors; telling COCO from GeoJSON."""

from __future__ import annotations

from pathlib import Path

from ..common.json_io import JSONFileError, read_json
from .errors import AnnotationError

COCO_KEYS = ("images", "annotations", "categories")
GEOJSON_TYPES = (
    "FeatureCollection",
    "Feature",
    "Polygon",
    "MultiPolygon",
    "GeometryCollection",
    "Point",
    "MultiPoint",
    "LineString",
    "MultiLineString",
)


def load_json(path: Path):
    """The parsed file; any way it fails to be JSON (even nesting too deep to parse) is an AnnotationError."""
    try:
        return read_json(path)
    except JSONFileError as exc:
        raise AnnotationError(path, exc.reason) from None


def is_coco(data) -> bool:
    """Whether parsed JSON means to be COCO: an object with any of its top-level keys, and no GeoJSON type.

    A file with only some of the keys is COCO with something missing, which
    `coco_from_data` says, rather than "not GeoJSON".
    """
    return isinstance(data, dict) and data.get("type") not in GEOJSON_TYPES and any(k in data for k in COCO_KEYS)
