"""A deterministic classical nucleus segmenter for tests: what the tiled engine must reproduce exactly.

Haematoxylin above a fixed threshold, opened, its connected pieces; pieces that
touch the image's border or span more than `max_extent` pixels are dropped. Every
step looks only at a few pixels around each pixel and at a piece's own extent, so
on a tile that holds a piece whole it gives the same piece as on the whole image,
and a clump cut by a tile's edge is dropped there as it is on the whole image.
With a halo of at least twice `max_extent` every kept piece lies whole in the tile
that owns it: the engine must then give the whole-image answer whatever the
tiling. (A watershed would not do: its ties are broken by the pixels' order.)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.morphology import disk

from napari_nephro.models.instances import TileInstances


def classical_nuclei(rgb: np.ndarray, threshold: float = 0.05, min_px: int = 12, max_extent: int = 30) -> np.ndarray:
    """Instance labels (int32) of the dark-purple blobs of an H&E image."""
    hed = rgb2hed(rgb)
    mask = ndimage.binary_opening(hed[..., 0] > threshold, structure=disk(1))
    parts, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(parts.ravel())
        mask = (sizes >= min_px)[parts] & mask
    parts, n = ndimage.label(mask)
    keep = np.zeros(n + 1, bool)
    h, w = parts.shape
    for i, (ys, xs) in enumerate(ndimage.find_objects(parts), start=1):
        inside = ys.start > 0 and xs.start > 0 and ys.stop < h and xs.stop < w
        keep[i] = inside and max(ys.stop - ys.start, xs.stop - xs.start) <= max_extent
    parts[~keep[parts]] = 0
    return parts.astype(np.int32)


class ClassicalNuclei:
    """The classical segmenter as an `InstanceSegmenter`; the class of an object is 0 or 1 by its size."""

    kind = "instance"
    fingerprint = "classical-nuclei-test"
    device = "cpu"

    def __init__(self, mpp: float = 0.5, tile_size: int = 256, overlap: int = 64) -> None:
        self.mpp, self.tile_size, self.overlap = mpp, tile_size, overlap
        self.classes = ["small", "large"]
        self.calls = 0

    def predict_instances(self, tiles: np.ndarray) -> list[TileInstances]:
        self.calls += len(tiles)
        out = []
        for tile in tiles:
            labels = classical_nuclei(tile)
            sizes = np.bincount(labels.ravel())
            classes = (sizes > 60).astype(np.int64)
            scores = np.clip(sizes / 100, 0, 1).astype(np.float32)
            out.append(TileInstances.from_labels(labels, classes, scores))
        return out
