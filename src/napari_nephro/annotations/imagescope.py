"""Aperio ImageScope XML (the MoNuSeg format) and, for reading, ASAP XML.

ImageScope keeps one `Annotation` element per layer (here: per class, named by the
layer's `Name` or its first non-empty attribute value) and one `Region` per object,
with `Vertex` points in level-0 pixels. A region with `NegativeROA="1"` is a hole
cut out of the positive regions it lies in. Region types: 0 polygon / freehand,
1 rectangle, 2 ellipse (two corner vertices); arrows and rulers are not areas.
ImageScope has no multi-part region: each part of a MultiPolygon is written as its
own region, and an attribute naming the object lets napari-nephro join them again.

ASAP (`ASAP_Annotations`) keeps `Annotation` elements with `PartOfGroup` as class
and `Coordinates/Coordinate` points.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import shapely
from shapely.geometry import Polygon

from ..common.paths import path_problem
from ._geometry import polygonal
from ._write import atomic_write_bytes
from .colors import class_color
from .errors import AnnotationError
from .model import UNCLASSIFIED, Annotation, AnnotationSet, as_area

POLYGON, RECTANGLE, ELLIPSE = "0", "1", "2"
ELLIPSE_VERTICES = 64
OBJECT_ATTRIBUTE = "napari-nephro object"  # groups the parts and holes of one object; ImageScope ignores it


def read_xml_annotations(path: str | os.PathLike[str], *, repair: bool = True) -> AnnotationSet:
    """Annotations from an ImageScope or ASAP XML file (the root element tells which)."""
    path = Path(path)
    root = _parse(path)
    if root.tag == "Annotations":
        return _imagescope(root, path, repair)
    if root.tag == "ASAP_Annotations":
        return _asap(root, path, repair)
    raise AnnotationError(path, f"not ImageScope or ASAP XML (root element <{root.tag}>)")


def read_imagescope_mpp(path: str | os.PathLike[str]) -> float | None:
    """The `MicronsPerPixel` ImageScope records on the root, if any."""
    value = _parse(Path(path)).get("MicronsPerPixel")
    try:
        mpp = float(value) if value else None
    except ValueError:
        return None
    return mpp if mpp and mpp > 0 else None


def _parse(path: Path) -> ET.Element:
    if problem := path_problem(path):
        raise AnnotationError(path, problem)
    if not path.is_file():
        raise AnnotationError(path, "no such file")
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AnnotationError(path, f"not valid XML ({exc})") from None


def _imagescope(root: ET.Element, path: Path, repair: bool) -> AnnotationSet:
    warnings: list[str] = []
    found: list[Annotation] = []
    classes = []
    for layer_index, layer in enumerate(root.iter("Annotation")):
        label = _layer_name(layer) or UNCLASSIFIED
        classes.append(label)
        positive: dict[str, list] = {}  # object key -> parts; regions we wrote carry the object they belong to
        negative: dict[str | None, list] = {}
        for region_index, region in enumerate(layer.iter("Region")):
            where = f"layer {layer_index} region {region.get('Id', region_index)}"
            ring = _region_ring(region, where, warnings)
            if ring is None:
                continue
            geometry = polygonal({"type": "Polygon", "coordinates": [ring]}, where, path, repair, warnings)
            if geometry is None:
                continue
            key = _object_key(region)
            if region.get("NegativeROA") == "1":
                negative.setdefault(key, []).append(geometry)
            else:
                positive.setdefault(key or f"region {region_index}", []).append(geometry)
        for key, parts in positive.items():
            geometry = parts[0] if len(parts) == 1 else shapely.union_all(parts)
            for hole in negative.get(key, []) + negative.get(None, []):
                if geometry.intersects(hole):
                    geometry = geometry.difference(hole)
            geometry = as_area(geometry)
            if geometry is not None:
                found.append(Annotation(geometry, label, "annotation", {"layer": layer_index}))
    return AnnotationSet(found, classes=classes, warnings=warnings)


def _object_key(region: ET.Element) -> str | None:
    for attribute in region.iter("Attribute"):
        if attribute.get("Name") == OBJECT_ATTRIBUTE:
            return "object " + attribute.get("Value", "")
    return None


def _layer_name(layer: ET.Element) -> str | None:
    if layer.get("Name", "").strip():
        return layer.get("Name").strip()
    for attribute in layer.iter("Attribute"):
        value = attribute.get("Value", "").strip()
        if value:
            return value
    return None


def _region_ring(region: ET.Element, where: str, warnings: list[str]) -> list[tuple[float, float]] | None:
    try:
        points = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
    except (TypeError, ValueError):
        warnings.append(f"{where}: vertex without numeric X and Y, skipped")
        return None
    kind = region.get("Type", POLYGON)
    if kind == ELLIPSE and len(points) >= 2:
        (x0, y0), (x1, y1) = points[0], points[-1]
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, abs(x1 - x0) / 2, abs(y1 - y0) / 2
        angles = [2 * math.pi * k / ELLIPSE_VERTICES for k in range(ELLIPSE_VERTICES)]
        return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]
    if kind == RECTANGLE and len(points) == 2:
        (x0, y0), (x1, y1) = points
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if kind not in (POLYGON, RECTANGLE):
        warnings.append(f"{where}: region type {kind} (arrow, ruler...) skipped, not an area")
        return None
    if len(points) < 3:
        warnings.append(f"{where}: fewer than 3 vertices, skipped")
        return None
    return points


def _asap(root: ET.Element, path: Path, repair: bool) -> AnnotationSet:
    warnings: list[str] = []
    found: list[Annotation] = []
    for index, element in enumerate(root.iter("Annotation")):
        where = f"annotation {element.get('Name', index)}"
        if element.get("Type", "Polygon") not in ("Polygon", "Spline", "Rectangle"):
            warnings.append(f"{where}: {element.get('Type')} skipped, not an area")
            continue
        coords = sorted(element.iter("Coordinate"), key=lambda c: int(c.get("Order", 0)))
        try:
            ring = [(float(c.get("X")), float(c.get("Y"))) for c in coords]
        except (TypeError, ValueError):
            warnings.append(f"{where}: coordinate without numeric X and Y, skipped")
            continue
        if len(ring) < 3:
            warnings.append(f"{where}: fewer than 3 points, skipped")
            continue
        geometry = polygonal({"type": "Polygon", "coordinates": [ring]}, where, path, repair, warnings)
        if geometry is not None:
            label = element.get("PartOfGroup") or UNCLASSIFIED
            found.append(Annotation(geometry, UNCLASSIFIED if label == "None" else label, "annotation"))
    return AnnotationSet(found, warnings=warnings)


def write_imagescope_xml(
    annotations: AnnotationSet,
    path: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    overwrite: bool = False,
) -> Path:
    """One ImageScope layer per class; holes become negative regions of the same layer."""
    root = ET.Element("Annotations")
    if mpp:
        root.set("MicronsPerPixel", f"{mpp:.6f}")
    for layer_id, label in enumerate(annotations.classes, start=1):
        members = [a for a in annotations if a.label == label]
        if not members:
            continue
        r, g, b = class_color(label)
        layer = ET.SubElement(
            root,
            "Annotation",
            Id=str(layer_id),
            Name="" if label == UNCLASSIFIED else label,
            LineColor=str(r + (g << 8) + (b << 16)),  # ImageScope stores colours as BGR integers
            Type="4",
            Visible="1",
        )
        attributes = ET.SubElement(layer, "Attributes")
        ET.SubElement(attributes, "Attribute", Name="Description", Id="0", Value="")
        regions = ET.SubElement(layer, "Regions")
        region_id = 0
        for object_id, ann in enumerate(members, start=1):
            for poly in ann.polygons():
                for ring, negative in [(poly.exterior, "0"), *((hole, "1") for hole in poly.interiors)]:
                    region_id += 1
                    _region(regions, region_id, ring.coords, negative, mpp, object_id)
    ET.indent(root)
    text = ET.tostring(root, encoding="unicode", xml_declaration=False)
    return atomic_write_bytes(path, text.encode(), overwrite=overwrite)


def _region(regions: ET.Element, region_id: int, coords, negative: str, mpp: float | None, object_id: int) -> None:
    ring = Polygon(coords)
    attrs = {"Id": str(region_id), "Type": POLYGON, "NegativeROA": negative, "Area": f"{ring.area:.1f}"}
    if mpp:
        attrs["AreaMicrons"] = f"{ring.area * mpp * mpp:.1f}"
    region = ET.SubElement(regions, "Region", **attrs)
    attributes = ET.SubElement(region, "Attributes")
    ET.SubElement(attributes, "Attribute", Name=OBJECT_ATTRIBUTE, Value=str(object_id))
    vertices = ET.SubElement(region, "Vertices")
    for x, y in list(coords)[:-1]:
        ET.SubElement(vertices, "Vertex", X=_num(x), Y=_num(y), Z="0")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"
