"""Label rasters produced tile by tile, at any pyramid level, from polygons or from an array.

Writers of label TIFFs and OME-Zarr pull tiles from a source, so a whole-slide label
image is never held in memory: polygons are rasterized directly at each level (exact
outlines, not a subsampled raster) and arrays (numpy or dask) are subsampled by
nearest neighbour, the only resampling that keeps instance ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from .model import AnnotationSet
from .raster import rasterize


class LabelSource(Protocol):
    shape: tuple[int, int]  # level 0, (height, width)
    dtype: np.dtype
    classes: dict[int, str]  # label value -> class name, {} when values carry no class

    def tile(self, downsample: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels [y:y+h, x:x+w] of the level with this downsample."""
        ...


class PolygonLabels:
    """Annotations drawn on demand: instance ids in file order, or class ids."""

    def __init__(self, annotations: AnnotationSet, shape: tuple[int, int], values: str = "instance") -> None:
        if values not in ("instance", "class"):
            raise ValueError(f"values must be 'instance' or 'class', not {values!r}")
        self.annotations, self.shape, self.values = annotations, tuple(shape), values
        n = len(annotations) if values == "instance" else len(annotations.classes)
        self.dtype = np.dtype(np.uint8 if n < 2**8 else np.uint16 if n < 2**16 else np.uint32)
        if values == "instance":
            self.classes = {i: a.label for i, a in enumerate(annotations, start=1)}
        else:
            self.classes = {annotations.class_id(c): c for c in annotations.classes}

    def tile(self, downsample: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        origin = (x * downsample, y * downsample)
        return rasterize(
            self.annotations, (h, w), downsample=downsample, origin=origin, values=self.values, dtype=self.dtype
        )


class ArrayLabels:
    """A label array (numpy or dask) as level 0; coarser levels take every n-th pixel."""

    def __init__(self, array, classes: dict[int, str] | None = None) -> None:
        if array.ndim != 2:
            raise ValueError(f"a label image must be 2-D, not shape {array.shape}")
        if np.dtype(array.dtype).kind not in "ui":
            raise ValueError(f"label values must be integers, not {array.dtype}")
        self.array, self.shape, self.dtype = array, tuple(array.shape), np.dtype(array.dtype)
        self.classes = dict(classes or {})

    def tile(self, downsample: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        d = downsample
        block = self.array[y * d : (y + h) * d : d, x * d : (x + w) * d : d]
        return np.asarray(block.compute() if hasattr(block, "compute") else block)


class Progress:
    """Counts tiles written across all levels and reports (done, total) to an optional callback."""

    def __init__(self, total: int, callback: Callable[[int, int], None] | None) -> None:
        self.done, self.total, self.callback = 0, total, callback

    def tick(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)


def pyramid_plan(
    shape: tuple[int, int], smallest: int, tile: int, callback: Callable[[int, int], None] | None = None
) -> tuple[list[tuple[int, tuple[int, int]]], Progress]:
    """The (downsample, level shape) of each level a writer makes, and a progress counter over their tiles."""
    levels = [(d, level_shape(shape, d)) for d in level_downsamples(shape, smallest)]
    total = sum(-(-h // tile) * -(-w // tile) for _, (h, w) in levels)
    return levels, Progress(total, callback)


def level_downsamples(shape: tuple[int, int], smallest: int = 512) -> list[int]:
    """Powers of two until the level's longer side is at most `smallest` pixels."""
    downsamples = [1]
    while max(shape) / downsamples[-1] > smallest:
        downsamples.append(downsamples[-1] * 2)
    return downsamples


def level_shape(shape: tuple[int, int], downsample: int) -> tuple[int, int]:
    """A level's size: every pixel of level 0 falls in one of its pixels."""
    return (-(-shape[0] // downsample), -(-shape[1] // downsample))


def tiles(shape: tuple[int, int], size: int):
    """(y, x, h, w) of the tiles covering `shape`, row by row."""
    for y in range(0, shape[0], size):
        for x in range(0, shape[1], size):
            yield y, x, min(size, shape[0] - y), min(size, shape[1] - x)
