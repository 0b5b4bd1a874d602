"""Read any supported annotation file: GeoJSON, COCO (one image), XML, a label / mask image, OME-Zarr labels."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..common.paths import path_problem
from ._json import is_coco, load_json
from .coco import coco_from_data
from .errors import AnnotationError
from .geojson import geojson_from_data
from .imagescope import read_xml_annotations
from .labeltiff import description_info, description_run
from .model import AnnotationSet
from .omezarr import read_label_zarr, refuse_unfinished, run_grid
from .raster import vectorize, vectorize_tiled

LABEL_IMAGE_EXTENSIONS = (".tif", ".tiff", ".png")
LABEL_SUFFIXES = ("_labels", "_label", "_masks", "_mask", "-labels", "-mask", "_annotations", "_gt")


def image_stem(name: str) -> str:
    """`image01_labels` -> `image01`: the image an annotation file is named after."""
    for suffix in LABEL_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class LabelFile:
    """A label image as read from disk: instance (or class) values, what each value is, the pixel size."""

    labels: Any  # 2-D numpy array, or a lazy dask array for OME-Zarr
    classes: dict[int, str] = field(default_factory=dict)
    mpp: float | None = None
    downsample: float = 1.0  # slide level-0 pixels per pixel (a segmentation written at the model's scale)
    slide_shape: tuple[int, int] | None = None  # the slide's level-0 (height, width), when the file records it

    def annotations(self) -> AnnotationSet:
        """One polygon per label value, in the slide's level-0 pixels; tile by tile for lazy (whole-slide) arrays."""
        if hasattr(self.labels, "compute"):
            return vectorize_tiled(self.labels, classes=self.classes, downsample=self.downsample)
        names = list(dict.fromkeys(self.classes.values())) or None
        return vectorize(self.labels, classes=self.classes or None, class_names=names, downsample=self.downsample)


def read_label_file(path: str | os.PathLike[str]) -> LabelFile:
    """A label TIFF / PNG (opened once) or OME-Zarr labels (level 0, lazily), with classes and mpp when recorded."""
    import tifffile
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if problem := path_problem(path):
        raise AnnotationError(path, problem)
    if path.suffix.lower() == ".zarr":
        pyramid = read_label_zarr(path)
        refuse_unfinished(pyramid, path)  # half a slide is no result
        return LabelFile(pyramid.levels[0], pyramid.classes, pyramid.mpp, pyramid.slide_downsample, pyramid.slide_shape)
    info, grid = None, (1.0, None)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                array = tif.asarray()
                description = tif.pages[0].description
            info, grid = description_info(description), run_grid(description_run(description))
        else:
            with Image.open(path) as im:
                array = np.asarray(im)
    except (tifffile.TiffFileError, UnidentifiedImageError, OSError, ValueError) as exc:
        raise AnnotationError(path, f"not a readable label image ({exc})") from None
    classes, mpp = info or ({}, None)
    return LabelFile(_instances(array, path), classes, mpp, *grid)


def read_label_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An instance label raster from a label image (TIFF or PNG)."""
    return read_label_file(path).labels


def _instances(array: np.ndarray, path: Path) -> np.ndarray:
    """Images with several foreground values are instance labels as they are. Masks
    with one foreground value, binary or RGB (e.g. red = glomerulus on black),
    become instances by connected components.
    """
    from scipy import ndimage

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
    if problem := path_problem(path):
        raise AnnotationError(path, problem)
    suffix = path.suffix.lower()
    if suffix in LABEL_IMAGE_EXTENSIONS or suffix == ".zarr":
        return read_label_file(path).annotations()
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
