"""Read any supported annotation file: GeoJSON, COCO (one image), or a label / mask image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._json import is_coco, load_json
from .coco import coco_from_data
from .errors import AnnotationError
from .geojson import geojson_from_data
from .imagescope import read_xml_annotations
from .labeltiff import read_label_tiff_info
from .model import AnnotationSet
from .omezarr import read_label_zarr
from .raster import vectorize, vectorize_tiled

LABEL_IMAGE_EXTENSIONS = (".tif", ".tiff", ".png")


def read_label_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An instance label raster from a label image.

    Images with several foreground values are instance labels as they are. Masks
    with one foreground value, binary or RGB (e.g. red = glomerulus on black),
    become instances by connected components.
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
    if array.min() < 0:
        raise AnnotationError(path, "label values must not be negative")
    if np.unique(array).size <= 2:  # a mask (one foreground value): its objects are its connected parts
        labels, _ = ndimage.label(array > 0)
        return labels.astype(np.uint32)
    return array.astype(np.uint32)


def read_annotations(path: str | os.PathLike[str], *, repair: bool = True, image: str | None = None) -> AnnotationSet:
    """Annotations from GeoJSON, one image of a COCO file, ImageScope / ASAP XML, a label image or OME-Zarr labels."""
    path = Path(path)
    if not path.exists():
        raise AnnotationError(path, "no such file")
    suffix = path.suffix.lower()
    if suffix in LABEL_IMAGE_EXTENSIONS:
        classes, _ = read_label_tiff_info(path) if suffix in (".tif", ".tiff") else ({}, None)
        return vectorize(read_label_image(path), classes=classes or None, class_names=_names(classes))
    if suffix == ".zarr":
        pyramid = read_label_zarr(path)
        return vectorize_tiled(pyramid.levels[0], classes=pyramid.classes)
    if suffix == ".xml":
        return read_xml_annotations(path, repair=repair)
    if suffix not in (".json", ".geojson"):
        raise AnnotationError(
            path,
            f"unknown annotation format {suffix!r} (GeoJSON, COCO .json, ImageScope/ASAP .xml, label .tif/.png/.zarr)",
        )
    data = load_json(path)
    if not is_coco(data):
        return geojson_from_data(data, path, repair=repair)
    images = coco_from_data(data, path, repair=repair)
    if image is None and len(images) == 1:
        return next(iter(images.values())).annotations
    matches = [im for name, im in images.items() if image in (name, Path(name).name, Path(name).stem)]
    if len(matches) != 1:
        raise AnnotationError(path, f"COCO file has {len(images)} images; name one with image=... (file name or stem)")
    return matches[0].annotations


def _names(classes: dict[int, str]) -> list[str] | None:
    return list(dict.fromkeys(classes.values())) or None
