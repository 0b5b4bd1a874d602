"""Tile grids at a chosen pixel size, and reading a tile of a slide at that size.

Grids are laid in level-0 pixels so that every consumer (training tile datasets,
the segmentation engine) agrees on where a tile is, whatever level it was read from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .io import Slide

BACKGROUND = 255  # outside the slide is glass: white, as the backends lay transparency over white


@dataclass(frozen=True)
class Tile:
    """A tile's box in level-0 pixels (may reach past the slide edge; read_scaled pads it)."""

    x: float
    y: float
    w: float
    h: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x, self.y, self.w, self.h)


def tile_grid(
    region: tuple[float, float, float, float], *, tile: int, overlap: int = 0, scale: float = 1.0
) -> list[Tile]:
    """Tiles of `tile` output pixels, overlapping by `overlap`, covering `region` (x, y, w, h in level 0).

    `scale` is level-0 pixels per output pixel (target mpp / slide mpp). The last row
    and column are moved back to end at the region's edge rather than running past
    it, so only a region smaller than one tile needs padding.
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"tile must be positive and overlap in [0, tile), got tile={tile} overlap={overlap}")
    x0, y0, w, h = region
    size, stride = tile * scale, (tile - overlap) * scale
    xs, ys = _starts(x0, w, size, stride), _starts(y0, h, size, stride)
    return [Tile(x, y, size, size) for y in ys for x in xs]


def _starts(origin: float, length: float, size: float, stride: float) -> list[float]:
    if length <= size:
        return [origin]
    count = int(np.ceil((length - size) / stride)) + 1
    starts = [origin + i * stride for i in range(count)]
    starts[-1] = origin + length - size
    return starts


def best_level(slide: Slide, scale: float) -> int:
    """The coarsest level still at least as fine as `scale` level-0 pixels per output pixel."""
    fine_enough = [i for i, d in enumerate(slide.level_downsamples) if d <= scale * 1.001]
    return max(fine_enough, key=lambda i: slide.level_downsamples[i]) if fine_enough else 0


def read_scaled(slide: Slide, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """RGB pixels of a level-0 box resampled to `size` (height, width), read from the best level.

    Parts of the box outside the slide are white. Only the remaining factor between
    the level and the target is resampled (area-averaging, as a scanner's pyramid does).
    """
    height, width = size
    x, y, w, h = box
    scale = w / width
    level = best_level(slide, scale)
    ds = slide.level_downsamples[level]
    lh, lw = slide.level_shapes[level]
    lx0, ly0 = int(np.floor(x / ds)), int(np.floor(y / ds))
    lx1, ly1 = int(np.ceil((x + w) / ds)), int(np.ceil((y + h) / ds))
    out = np.full((ly1 - ly0, lx1 - lx0, 3), BACKGROUND, np.uint8)
    cx0, cy0, cx1, cy1 = max(lx0, 0), max(ly0, 0), min(lx1, lw), min(ly1, lh)
    if cx1 > cx0 and cy1 > cy0:
        out[cy0 - ly0 : cy1 - ly0, cx0 - lx0 : cx1 - lx0] = slide.region(level, (cx0, cy0, cx1 - cx0, cy1 - cy0))
    if out.shape[:2] == (height, width):
        return out
    # crop the fractional box exactly while resampling
    fx, fy = x / ds - lx0, y / ds - ly0
    resample_box = (fx, fy, fx + w / ds, fy + h / ds)
    resized = Image.fromarray(out).resize((width, height), Image.Resampling.BOX, box=resample_box)
    return np.asarray(resized)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels that look like stained tissue, not glass: saturated or dark enough.

    Brightfield glass is near-white and grey; H&E, PAS, Masson and silver stains are
    all either coloured or dark. Thresholds are loose on purpose: a tile is kept when
    in doubt.
    """
    rgb = rgb.astype(np.int16)
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    darkness = 255 - rgb.mean(axis=-1)
    return (saturation > 20) | (darkness > 60)


def tissue_fraction(rgb: np.ndarray) -> float:
    """Share of a tile's pixels that look like tissue (see `tissue_mask`)."""
    return float(np.mean(tissue_mask(rgb[::4, ::4])))  # a 1-in-16 sample decides as well and costs 16x less
