"""QuPath GeoJSON: a FeatureCollection or a bare list of Features, with `classification.name`."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from shapely.geometry import mapping

from ._geometry import polygonal
from ._json import load_json
from ._write import atomic_write_bytes
from .colors import class_color
from .errors import AnnotationError
from .model import UNCLASSIFIED, Annotation, AnnotationSet


def read_geojson(path: str | os.PathLike[str], *, repair: bool = True) -> AnnotationSet:
    """Read polygons and their classes; `repair=False` refuses invalid (self-intersecting) polygons."""
    path = Path(path)
    return geojson_from_data(load_json(path), path, repair=repair)


def geojson_from_data(data, path: Path, *, repair: bool = True) -> AnnotationSet:
    """Annotations from already-parsed GeoJSON (`path` only names the file in messages)."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and data.get("type") in ("Polygon", "MultiPolygon"):
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    elif isinstance(data, list):
        features = data
    else:
        raise AnnotationError(path, "not GeoJSON: expected a FeatureCollection, a Feature or a list of Features")
    if not isinstance(features, list):
        raise AnnotationError(path, f'"features" must be a list of Features, not {type(features).__name__}')
    warnings: list[str] = []
    found = []
    no_geometry, not_features = [], []
    for i, feature in enumerate(features):
        if not isinstance(feature, dict):
            not_features.append(i)
            continue
        if not isinstance(feature.get("geometry"), dict):  # null (QuPath writes it for objects without a ROI)
            no_geometry.append(i)
            continue
        geometry = polygonal(feature["geometry"], f"feature {i}", path, repair, warnings)
        if geometry is None:
            continue
        props = feature.get("properties")
        props = props if isinstance(props, dict) else {}
        classification = props.get("classification") or {}
        label = classification.get("name") if isinstance(classification, dict) else None
        object_type = props.get("objectType", "annotation")
        found.append(Annotation(geometry, label or UNCLASSIFIED, object_type, {"index": i}))
    if no_geometry:
        warnings.insert(0, _skipped(no_geometry, "feature without geometry", "features without geometry"))
    if not_features:
        warnings.insert(0, _skipped(not_features, "entry that is not a Feature", "entries that are not Features"))
    return AnnotationSet(found, warnings=warnings)


def _skipped(indices: list[int], one: str, many: str) -> str:
    """`2 features without geometry were skipped (numbers 3, 7)`: one note however many there are."""
    shown = ", ".join(str(i) for i in indices[:5]) + (", ..." if len(indices) > 5 else "")
    if len(indices) == 1:
        return f"1 {one} was skipped (number {shown}, counting from 0)"
    return f"{len(indices)} {many} were skipped (numbers {shown}, counting from 0)"


def write_geojson(annotations: AnnotationSet, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write a FeatureCollection QuPath opens: objectType, classification name and colour."""
    features = []
    for ann in annotations:
        properties = {"objectType": ann.object_type}
        if ann.label != UNCLASSIFIED:
            properties["classification"] = {"name": ann.label, "color": list(class_color(ann.label))}
        features.append(
            {"type": "Feature", "id": str(uuid.uuid4()), "geometry": mapping(ann.geometry), "properties": properties}
        )
    text = json.dumps({"type": "FeatureCollection", "features": features})
    return atomic_write_bytes(path, text.encode(), overwrite=overwrite)
