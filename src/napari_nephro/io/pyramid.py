"""Extra coarse levels for display, for files that store too few of their own."""

from __future__ import annotations

import dask.array as da
import numpy as np

DISPLAY_MAX_SIDE = 4096


def display_pyramid(levels: list[da.Array], max_side: int = DISPLAY_MAX_SIDE) -> list[da.Array]:
    """`levels` plus 2x mean-reduced levels until the coarsest fits in `max_side` pixels.

    A one-level 20k x 20k TIFF (or a 10k x 10k PNG) would make napari read every pixel to show the
    whole image zoomed out; lazily averaged levels let it read a fraction. These levels
    are for viewing only: analysis reads the file's own levels.
    """
    out = list(levels)
    while max(out[-1].shape[:2]) > max_side:
        level = out[-1]
        even = tuple(tuple(c + (c % 2) for c in axis) for axis in level.chunks[:2])  # coarsen needs even chunks
        level = level.rechunk((*[max(axis) for axis in even], 3))
        out.append(da.coarsen(np.mean, level, {0: 2, 1: 2}, trim_excess=True).round().astype(np.uint8))
    return out
