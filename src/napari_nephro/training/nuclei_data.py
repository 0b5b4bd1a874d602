"""Nucleus training images: whole images with their instance labels, at the model's working scale.

Nucleus datasets are a few dozen small images (MoNuSeg 1000 px, MICCAI 2015 and
NuInsSeg 500 px), so each is kept whole in memory at the working pixel size and
training draws random crops from it. Labels stay instances (not classes): the
HoVer targets are made per crop after augmentation, where each nucleus's centre
is known exactly (`models.hovernet.hv_targets`).

Vector annotations (MoNuSeg's ImageScope XML, GeoJSON) are drawn straight at the
working scale; label images are resampled by nearest neighbour.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..annotations.io import image_stem
from ..annotations.raster import rasterize
from ..io import open_slide
from ..pipelines.export import Item, load_items
from ..tiling import read_scaled
from .errors import TrainingError

MIN_SIDE = 64  # px at the working scale: smaller images hold too little context to train on


@dataclass
class NucleusImage:
    """One image at the working scale: RGB, instance ids (0 background), its source for the split."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int32
    group: str
    mpp: float  # the image's own pixel size, before rescaling

    @property
    def count(self) -> int:
        return int(np.unique(self.labels).size - (self.labels == 0).any())


def nucleus_images(
    annotations: str | os.PathLike[str],
    images: str | os.PathLike[str],
    *,
    mpp: float,
    image_mpp: float | None = None,
    group: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[NucleusImage]:
    """The annotated images of a file or folder (matched by stem) at `mpp`, each labelled by instance.

    Refused before reading pixels: images whose pixel size is unknown (give
    `image_mpp`), annotations without their image, images without a nucleus.
    """
    items = load_items(annotations, slide=images)
    missing = [i.name for i in items if i.image is None]
    if missing:
        raise TrainingError(f"no image found for {', '.join(missing[:3])}: give --images with files named by stem")
    unknown = [i.name for i in items if (i.mpp or image_mpp) is None]
    if unknown:
        raise TrainingError(f"{', '.join(unknown[:3])}: the pixel size is unknown; give it with --image-mpp")
    out = []
    for done, item in enumerate(items, start=1):
        out.append(nucleus_image(item, mpp, item.mpp or image_mpp, group))
        if progress is not None:
            progress(done, len(items))
    empty = [n.name for n in out if n.count == 0]
    if empty:
        raise TrainingError(f"{len(empty)} image(s) hold no nucleus ({', '.join(empty[:3])}): check the annotations")
    return out


def nucleus_image(item: Item, mpp: float, own_mpp: float, group: str | None) -> NucleusImage:
    """One image and its instance labels (raster or polygons) read at `mpp` from its own `own_mpp`."""
    h, w = item.shape
    factor = own_mpp / mpp
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    if min(size) < MIN_SIDE:
        raise TrainingError(
            f"{item.name}: {w}x{h} px at {own_mpp:g} um/px is under {MIN_SIDE} px at {mpp:g} um/px: too small"
        )
    with open_slide(item.image, mpp=None if item.mpp else own_mpp) as slide:
        image = read_scaled(slide, (0, 0, w, h), size)
    if item.raster is not None:
        labels = np.asarray(item.raster.labels)
        rows = np.minimum(((np.arange(size[0]) + 0.5) / factor).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(size[1]) + 0.5) / factor).astype(np.int64), w - 1)
        labels = labels[np.ix_(rows, cols)].astype(np.int32)
    else:
        labels = rasterize(item.vectors(), size, downsample=1 / factor, values="instance", dtype=np.int32)
    name = image_stem(item.name)  # image01_labels -> image01
    return NucleusImage(name, image, labels, group or name, own_mpp)


def split_images(images: list[NucleusImage], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices for training and validation, whole sources (groups) to one side."""
    from .data import split_by_group

    train, val = split_by_group([n.group for n in images], val_fraction, seed)
    return train.tolist(), val.tolist()
