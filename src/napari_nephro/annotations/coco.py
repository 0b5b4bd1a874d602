"""COCO JSON: polygons and RLE masks per image, with categories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import Polygon

from ._geometry import polygonal
from ._json import COCO_KEYS, load_json
from ._write import atomic_write_bytes
from .errors import AnnotationError
from .model import Annotation, AnnotationSet
from .raster import rasterize, vectorize
from .rle import rle_decode, rle_encode


class CocoImage:
    """One image entry of a COCO file and its annotations."""

    def __init__(self, file_name: str, height: int, width: int, annotations: AnnotationSet) -> None:
        self.file_name, self.height, self.width, self.annotations = file_name, height, width, annotations

    @property
    def stem(self) -> str:
        return Path(self.file_name).stem


def read_coco(path: str | os.PathLike[str], *, repair: bool = True) -> dict[str, CocoImage]:
    """Images by file name, each with its annotations (category names as classes)."""
    path = Path(path)
    return coco_from_data(load_json(path), path, repair=repair)


def coco_from_data(data, path: Path, *, repair: bool = True) -> dict[str, CocoImage]:
    """Images of already-parsed COCO JSON (`path` only names the file in messages)."""
    if not isinstance(data, dict):
        raise AnnotationError(path, f"not COCO: expected a JSON object, not {_kind(data)}")
    missing = [k for k in COCO_KEYS if k not in data]
    if missing:
        present = [k for k in COCO_KEYS if k in data]
        raise AnnotationError(
            path,
            f"COCO file without {_quoted(missing)}"
            + (f" (it has {_quoted(present)})" if present else "")
            + ': a COCO file lists "images" (id, file_name, width, height), "annotations" and "categories"',
        )
    for key in COCO_KEYS:
        if not isinstance(data[key], list):
            raise AnnotationError(path, f'COCO "{key}" must be a list, not {_kind(data[key])}')
    try:
        return _coco_images(data, path, repair)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # e.g. a number where an object belongs
        raise AnnotationError(path, f"malformed COCO entry ({exc.__class__.__name__}: {exc})") from None


def _quoted(keys: list[str]) -> str:
    names = [f'"{k}"' for k in keys]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def _coco_images(data: dict, path: Path, repair: bool) -> dict[str, CocoImage]:
    names = {c["id"]: str(c["name"]) for c in data["categories"]}
    classes = list(names.values())
    images = {}
    by_id = {}
    for im in data["images"]:
        entry = {
            "file_name": im["file_name"],
            "height": int(im["height"]),
            "width": int(im["width"]),
            "found": [],
            "warnings": [],
        }
        by_id[im["id"]] = entry
    for i, ann in enumerate(data["annotations"]):
        entry = by_id.get(ann.get("image_id"))
        if entry is None:
            raise AnnotationError(
                path, f"annotation {i} refers to image id {ann.get('image_id')!r}, which is not listed"
            )
        if ann.get("category_id") not in names:
            raise AnnotationError(
                path, f"annotation {i} has category id {ann.get('category_id')!r}, which is not listed"
            )
        geometry = _segmentation(ann.get("segmentation"), entry, f"annotation {i}", path, repair)
        if geometry is None:
            continue
        props = {"id": ann.get("id"), "iscrowd": ann.get("iscrowd", 0)}
        entry["found"].append(Annotation(geometry, names[ann["category_id"]], "annotation", props))
    for entry in by_id.values():
        annotations = AnnotationSet(entry["found"], classes=classes, warnings=entry["warnings"])
        images[entry["file_name"]] = CocoImage(entry["file_name"], entry["height"], entry["width"], annotations)
    return images


def _segmentation(seg, entry, where, path, repair):
    if isinstance(seg, list):
        parts = []
        for k, flat in enumerate(seg):
            if len(flat) < 6 or len(flat) % 2:
                entry["warnings"].append(f"{where} part {k}: fewer than 3 points, skipped")
                continue
            ring = np.asarray(flat, float).reshape(-1, 2).tolist()
            part = polygonal(
                {"type": "Polygon", "coordinates": [ring]}, f"{where} part {k}", path, repair, entry["warnings"]
            )
            if part is not None:
                parts.extend(getattr(part, "geoms", [part]))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else shapely.union_all(parts)
    if isinstance(seg, dict) and "counts" in seg:
        if [int(v) for v in seg.get("size", ())] != [entry["height"], entry["width"]]:
            raise AnnotationError(
                path, f"{where}: RLE size {seg.get('size')} is not the image's [{entry['height']}, {entry['width']}]"
            )
        try:
            mask = rle_decode(seg)
        except (ValueError, KeyError, TypeError) as exc:
            raise AnnotationError(path, f"{where}: bad RLE ({exc})") from None
        found = vectorize(mask.astype(np.uint8))
        return found[0].geometry if len(found) else None
    raise AnnotationError(path, f"{where}: segmentation is neither polygons nor RLE")


def write_coco(
    images: dict[str, tuple[AnnotationSet, tuple[int, int]]],
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write {file_name: (annotations, (height, width))}; polygons with holes are written as RLE."""
    classes: list[str] = []
    for image_annotations, _ in images.values():
        classes.extend(c for c in image_annotations.classes if c not in classes)
    out = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    ann_id = 1
    for image_id, (file_name, (image_annotations, (h, w))) in enumerate(images.items(), start=1):
        out["images"].append({"id": image_id, "file_name": file_name, "height": int(h), "width": int(w)})
        for ann in image_annotations:
            polys = ann.polygons()
            if any(p.interiors for p in polys):
                single = AnnotationSet([ann])
                segmentation = rle_encode(rasterize(single, (h, w)) > 0)
            else:
                segmentation = [_flat(p) for p in polys]
            x0, y0, x1, y1 = ann.bounds
            out["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": classes.index(ann.label) + 1,
                    "segmentation": segmentation,
                    "area": ann.area,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    return atomic_write_bytes(path, json.dumps(out).encode(), overwrite=overwrite)


def _flat(poly: Polygon) -> list[float]:
    return [round(v, 3) for xy in list(poly.exterior.coords)[:-1] for v in xy]
