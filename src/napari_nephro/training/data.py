"""Training tiles: (image, class mask) pairs cut from slides or images and their annotations.

Tiles are cut on the engine's grid (`tiling.tile_grid`) at the model's mpp and
read straight at the network's input size (the model never sees anything else),
so a dataset of a few hundred tiles holds in memory. Each tile remembers its
source image: the train / validation split is by source, never by tile.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ..annotations import AnnotationSet
from ..annotations.model import Annotation
from ..annotations.raster import rasterize
from ..io import open_slide
from ..pipelines.export import Item
from ..tiling import read_scaled, tile_grid, tissue_fraction
from .errors import TrainingError

IGNORE = "ignore"  # a class mapped to this is left out of the masks (drawn as background)
MIN_TISSUE = 0.05  # tiles with less tissue and no object are glass: not worth training on
SINGLE_SOURCE_BANDS = 5  # one slide alone is split by vertical bands: validation never shares a band with training


@dataclass
class TileSet:
    images: np.ndarray  # (N, S, S, 3) uint8, S = the network's input size
    masks: np.ndarray  # (N, S, S) uint8 class ids, 0 = background
    groups: list[str]  # source image of each tile
    classes: list[str]  # class id - 1 -> name
    weights: np.ndarray = field(default_factory=lambda: np.ones(0))  # sampling weight per tile

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> TileSet:
        index = np.asarray(index, dtype=np.int64)
        return TileSet(
            self.images[index], self.masks[index], [self.groups[i] for i in index], self.classes, self.weights[index]
        )

    def class_pixels(self) -> dict[str, int]:
        counts = np.bincount(self.masks.ravel(), minlength=len(self.classes) + 1)
        return {name: int(counts[i]) for i, name in enumerate(self.classes, start=1)}


def map_classes(
    items: list[Item], classes: list[str], class_map: Mapping[str, str] | None = None
) -> dict[str, AnnotationSet]:
    """Each item's annotations with their labels turned into the model's classes.

    With one class every object is that class (a foreground model), whatever its
    label. With several, a label must be a class name or be mapped (`gs=global
    sclerosis`, `gl=ignore`); anything else is refused, listing what is missing.
    """
    class_map = dict(class_map or {})
    unknown_targets = sorted({v for v in class_map.values() if v not in classes and v != IGNORE})
    if unknown_targets:
        raise TrainingError(f"--map sends labels to {', '.join(unknown_targets)}, which are not among the classes")
    mapped, unknown = {}, set()
    for item in items:
        objects = []
        for ann in item.vectors():
            name = class_map.get(ann.label, ann.label if ann.label in classes else None)
            if name is None and len(classes) == 1:
                name = classes[0]
            if name is None:
                unknown.add(ann.label)
            elif name != IGNORE:
                objects.append(Annotation(ann.geometry, name, ann.object_type, ann.properties))
        mapped[item.name] = AnnotationSet(objects, classes=list(classes))
    if unknown:
        raise TrainingError(
            f"annotation classes {', '.join(sorted(unknown))} are not among the model's classes "
            f"({', '.join(classes)}): map them with --map LABEL=CLASS (or LABEL=ignore)"
        )
    return mapped


def cut_tiles(
    items: list[Item],
    *,
    classes: list[str],
    mpp: float | None,
    tile: int,
    overlap: int,
    input_size: int,
    class_map: Mapping[str, str] | None = None,
    image_mpp: float | None = None,
    allow_empty: bool = False,
    oversample: Mapping[str, float] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TileSet:
    """Tiles of every item at `mpp` (the images' own scale when None), read at `input_size`.

    Refused before anything is read: images without their picture, images whose
    pixel size is unknown when `mpp` is asked for, and (unless `allow_empty`)
    images without any object.
    """
    missing = [i.name for i in items if i.image is None]
    if missing:
        raise TrainingError(f"no image found for {', '.join(missing[:3])}: give --images with files named by stem")
    mapped = map_classes(items, classes, class_map)
    empty = [i.name for i in items if not len(mapped[i.name])]
    if empty and not allow_empty:
        raise TrainingError(
            f"{len(empty)} image(s) have no object ({', '.join(empty[:3])}): "
            "pass --allow-empty to train on them as negatives"
        )
    unknown_mpp = [i.name for i in items if mpp is not None and (i.mpp or image_mpp) is None]
    if unknown_mpp:
        raise TrainingError(
            f"{', '.join(unknown_mpp[:3])}: the pixel size is unknown; give it with --image-mpp "
            f"(or train at the images' own scale without --mpp)"
        )
    grids = []
    for item in items:
        scale = 1.0 if mpp is None else mpp / (item.mpp or image_mpp)
        h, w = item.shape
        grids.append(tile_grid((0, 0, w, h), tile=tile, overlap=overlap, scale=scale))
    total, done = sum(len(g) for g in grids), 0
    images, masks, groups = [], [], []
    bands = SINGLE_SOURCE_BANDS if len(items) == 1 else 1
    for item, grid in zip(items, grids, strict=True):
        annotations = mapped[item.name]
        with open_slide(item.image, mpp=None if item.mpp else image_mpp) as slide:
            for t in grid:
                done += 1
                downsample = t.w / input_size
                mask = rasterize(
                    annotations, (input_size, input_size), downsample=downsample, origin=(t.x, t.y), values="class"
                ).astype(np.uint8)
                image = read_scaled(slide, t.box, (input_size, input_size))
                if mask.any() or tissue_fraction(image) >= MIN_TISSUE:
                    images.append(image)
                    masks.append(mask)
                    groups.append(_group(item, t, bands))
                if progress is not None:
                    progress(done, total)
    if not images:
        raise TrainingError("no tile holds tissue or an object: check the images and annotations")
    tiles = TileSet(np.stack(images), np.stack(masks), groups, list(classes))
    tiles.weights = sample_weights(tiles, oversample)
    return tiles


def _group(item: Item, t, bands: int) -> str:
    """The tile's source; for a single source, its vertical band (the split needs whole groups on each side)."""
    if bands == 1:
        return item.name
    band = min(bands - 1, int((t.x + t.w / 2) / item.shape[1] * bands))
    return f"{item.name} band {band + 1}/{bands}"


def sample_weights(tiles: TileSet, oversample: Mapping[str, float] | None) -> np.ndarray:
    """1 per tile, or the largest factor of the classes it holds (`{"global sclerosis": 4}`)."""
    weights = np.ones(len(tiles))
    for name, factor in (oversample or {}).items():
        if name not in tiles.classes:
            raise TrainingError(f"--oversample names {name!r}, not one of the classes ({', '.join(tiles.classes)})")
        if not factor > 0 or not math.isfinite(factor):
            raise TrainingError(f"--oversample factors must be positive, not {factor}")
        value = tiles.classes.index(name) + 1
        holds = (tiles.masks == value).any(axis=(1, 2))
        weights[holds] = np.maximum(weights[holds], factor)
    return weights


def split_by_group(groups: list[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile indices for training and validation, whole sources to one side or the other.

    At least one source goes to each side when there are two or more.
    """
    names = sorted(set(groups))
    if len(names) < 2:
        raise TrainingError(f"training needs at least two images or slides (one for validation), got {len(names)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    val_names = {names[i] for i in order[:n_val]}
    is_val = np.array([g in val_names for g in groups])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
