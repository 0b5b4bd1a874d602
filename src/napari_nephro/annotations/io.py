"""Read any supported annotation file: GeoJSON, COCO (one image), or a label / mask image."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import AnnotationError
from .model import AnnotationSet
from .raster import vectorize

LABEL_IMAGE_EXTENSIONS = (".tif", ".tiff", ".png")


def read_label_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An instance label raster from a label image.

    Integer images with many values are instance labels as they are. Binary or RGB
    masks (e.g. red = glomerulus on black) become instances by connected components.
    """
    import tifffile
    from PIL import Image, UnidentifiedImageError
    from scipy import ndimage

    path = Path(path)
    if not path.exists():
        raise AnnotationError(path, "no such file")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            array = tifffile.imread(path)
        else:
            with Image.open(path) as im:
                array = np.asarray(im)
    except (tifffile.TiffFileError, UnidentifiedImageError, OSError, ValueError) as exc:
        raise AnnotationError(path, f"not a readable label image ({exc})") from None
    array = np.squeeze(array)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = array[..., :3].any(axis=-1)
    if array.ndim != 2:
        raise AnnotationError(path, f"a label image must be 2-D (or an RGB mask), not shape {array.shape}")
    if array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
        raise AnnotationError(path, "label values must be whole numbers, this image has fractions")
    if array.dtype == bool or (len(np.unique(array[:: max(1, array.shape[0] // 256)])) <= 2 and array.max() <= 255):
        if array.dtype != bool and array.max() > 1 and np.unique(array).size > 2:
            return array.astype(np.uint32)
        labels, _ = ndimage.label(array > 0)
        return labels.astype(np.uint32)
    if array.min() < 0:
        raise AnnotationError(path, "label values must not be negative")
    return array.astype(np.uint32)


def read_annotations(path: str | os.PathLike[str], *, repair: bool = True, image: str | None = None) -> AnnotationSet:
    """Annotations from a GeoJSON file, one image of a COCO file, or a label image."""
    from .coco import read_coco
    from .geojson import read_geojson

    path = Path(path)
    if not path.exists():
        raise AnnotationError(path, "no such file")
    suffix = path.suffix.lower()
    if suffix in LABEL_IMAGE_EXTENSIONS:
        return vectorize(read_label_image(path))
    if suffix in (".json", ".geojson"):
        if suffix == ".json" and _looks_like_coco(path):
            images = read_coco(path, repair=repair)
            if image is None and len(images) == 1:
                return next(iter(images.values())).annotations
            matches = [im for name, im in images.items() if image in (name, Path(name).name, Path(name).stem)]
            if len(matches) != 1:
                raise AnnotationError(
                    path, f"COCO file has {len(images)} images; name one with image=... (file name or stem)"
                )
            return matches[0].annotations
        return read_geojson(path, repair=repair)
    raise AnnotationError(path, f"unknown annotation format {suffix!r} (GeoJSON, COCO .json, label .tif/.png)")


def _looks_like_coco(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            head = fh.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    return '"images"' in head or ('"annotations"' in head and '"categories"' in head) or _has_coco_keys(path)


def _has_coco_keys(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "images" in data and "annotations" in data
