"""Tile grids at a chosen pixel size, and reading a tile of a slide at that size.

Grids are laid in level-0 pixels so that every consumer (training tile datasets,
the segmentation engine) agrees on where a tile is, whatever level it was read from.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .common.limits import MAX_GRID_TILES
from .io import Slide

BACKGROUND = 255  # outside the slide is glass: white, as the backends lay transparency over white
# `read_scaled` reads a box's pixels at its level in one piece up to READ_BLOCK_PIXELS (192 MiB of RGB),
# with at most READ_MARGIN_PIXELS of white around the slide's part, and larger parts block by block,
# REDUCE_BLOCK_PIXELS at a time: the tissue thumbnail of a one-level 30 Gpx slide reads it all.
READ_BLOCK_PIXELS = 2**26
READ_MARGIN_PIXELS = 2**20
REDUCE_BLOCK_PIXELS = 2**22


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
    nx, ny = _count(w, size, stride), _count(h, size, stride)
    if nx * ny > MAX_GRID_TILES:
        raise GridError(
            f"{nx * ny:.3g} tiles of {tile} px (overlap {overlap}) would cover this area: at most "
            f"{MAX_GRID_TILES:,} in one run; use larger tiles, a coarser pixel size or a smaller region"
        )
    xs, ys = _starts(x0, w, size, stride, nx), _starts(y0, h, size, stride, ny)
    return [Tile(x, y, size, size) for y in ys for x in xs]


class GridError(ValueError):
    """A grid of absurdly many tiles (a user's scale or tile size), refused before it is laid: one line."""


def _count(length: float, size: float, stride: float) -> int:
    return 1 if length <= size else math.ceil((length - size) / stride) + 1


def _starts(origin: float, length: float, size: float, stride: float, count: int) -> list[float]:
    if count == 1:
        return [origin]
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

    Memory stays bounded whatever the box: only the output pixels that touch the slide are
    computed (the rest is white without being read). Their pixels at the level are the part of
    the box on the slide plus a white margin of about one output pixel's footprint; they are
    read in one piece (`_resample_direct`, Pillow) when that is at most READ_BLOCK_PIXELS with at
    most READ_MARGIN_PIXELS of margin, and otherwise summed block by block from the slide's
    part alone (`_reduce_blockwise`), so neither a huge level nor a box mostly off a small
    slide is ever held whole.
    """
    height, width = (int(v) for v in size)
    x, y, w, h = (float(v) for v in box)
    if height < 1 or width < 1 or not (w > 0 and h > 0):
        raise ValueError(f"read_scaled needs a box and a size of at least one pixel, got box={box} size={size}")
    level = best_level(slide, w / width)
    ds = slide.level_downsamples[level]
    lh, lw = slide.level_shapes[level]
    # the box in the level's pixels, and the size of one output pixel there
    rows = _Axis(y / ds, h / ds / height, height, lh)
    cols = _Axis(x / ds, w / ds / width, width, lw)
    if not (rows.touched and cols.touched):
        return np.full((height, width, 3), BACKGROUND, np.uint8)  # the box lies wholly off the slide
    (i0, i1), (j0, j1) = rows.touched, cols.touched
    (b0, b1), (c0, c1) = rows.buffer, cols.buffer
    buffer_pixels = (b1 - b0) * (c1 - c0)
    on_slide = rows.on_slide * cols.on_slide
    direct = rows.step < 1 or cols.step < 1  # enlarging: the buffer is smaller than the output
    if direct or (buffer_pixels <= READ_BLOCK_PIXELS and buffer_pixels - on_slide <= READ_MARGIN_PIXELS):
        part = _resample_direct(slide, level, rows, cols)
    else:
        part = _reduce_blockwise(slide, level, rows, cols)
    if (i0, i1, j0, j1) == (0, height, 0, width):
        return part  # every output pixel touches the slide: the usual tile, no white frame to lay it in
    out = np.full((height, width, 3), BACKGROUND, np.uint8)
    out[i0:i1, j0:j1] = part
    return out


class _Axis:
    """One axis of a `read_scaled` box at its level: output pixel i covers level positions
    (start + i * step, start + (i + 1) * step], and takes the pixels whose centres lie there
    (Pillow's BOX filter), within the box's whole pixels [floor(start), ceil(start + n * step))."""

    def __init__(self, start: float, step: float, n: int, length: int) -> None:
        self.start, self.step, self.n, self.length = start, step, n, length
        end = start + n * step
        self.whole = (math.floor(start), math.ceil(end))  # the box's pixels at the level, on the slide or not
        support = max(step, 1.0) / 2  # Pillow's half-width of an output pixel's footprint
        # output pixels whose footprint may hold a pixel of the slide (one more each side, to be sure):
        # pixel p is taken by output pixel i when its centre p + 0.5 is within `support` of i's centre
        lo = max(0, math.floor((0.5 - support - start) / step - 0.5) - 1)
        hi = min(n, math.ceil((length - 0.5 + support - start) / step - 0.5) + 1)
        self.touched = (lo, hi) if lo < hi and start < length and end > 0 else None
        if self.touched is None:
            return
        first = start + (lo + 0.5) * step - support
        last = start + (hi - 0.5) * step + support
        self.buffer = (max(self.whole[0], math.floor(first)), min(self.whole[1], math.ceil(last)))
        self.on_slide = max(0, min(self.buffer[1], length) - max(self.buffer[0], 0))

    def relative_box(self) -> tuple[float, float]:
        """The touched output pixels' span in the buffer's coordinates, for Pillow."""
        lo, hi = self.touched
        size = self.buffer[1] - self.buffer[0]
        a = min(max(self.start + lo * self.step - self.buffer[0], 0.0), size)
        b = min(max(self.start + hi * self.step - self.buffer[0], a), size)
        return a, b

    def bounds(self) -> np.ndarray:
        """First pixel of each touched output pixel's footprint, and the end of the last (n + 1 values)."""
        lo, hi = self.touched
        edges = self.start + self.step * np.arange(lo, hi + 1, dtype=np.float64)
        first = np.floor(edges - 0.5).astype(np.int64) + 1  # pixel p is taken when edge < p + 0.5 <= next edge
        return np.clip(first, *self.whole)


def _resample_direct(slide: Slide, level: int, rows: _Axis, cols: _Axis) -> np.ndarray:
    """The touched output pixels through Pillow, from one buffer: the slide's pixels and a white margin."""
    (b0, b1), (c0, c1) = rows.buffer, cols.buffer
    lh, lw = rows.length, cols.length
    sy0, sy1, sx0, sx1 = max(b0, 0), min(b1, lh), max(c0, 0), min(c1, lw)
    if (sy0, sy1, sx0, sx1) == (b0, b1, c0, c1):  # wholly on the slide: no white margin to add
        buffer = np.asarray(slide.region(level, (c0, b0, c1 - c0, b1 - b0)))
    else:
        buffer = np.full((b1 - b0, c1 - c0, 3), BACKGROUND, np.uint8)
        if sy1 > sy0 and sx1 > sx0:
            buffer[sy0 - b0 : sy1 - b0, sx0 - c0 : sx1 - c0] = slide.region(level, (sx0, sy0, sx1 - sx0, sy1 - sy0))
    (i0, i1), (j0, j1) = rows.touched, cols.touched
    (ya, yb), (xa, xb) = rows.relative_box(), cols.relative_box()
    if (i1 - i0, j1 - j0) == buffer.shape[:2] and (xa, ya, xb, yb) == (0, 0, buffer.shape[1], buffer.shape[0]):
        return buffer  # the box is the level's own pixels: nothing to resample
    # crop the fractional box exactly while resampling
    resized = Image.fromarray(buffer).resize((j1 - j0, i1 - i0), Image.Resampling.BOX, box=(xa, ya, xb, yb))
    return np.asarray(resized)


def _reduce_blockwise(slide: Slide, level: int, rows: _Axis, cols: _Axis) -> np.ndarray:
    """The touched output pixels as means of their footprints, summed block by block.

    The same pixels as Pillow's BOX filter take (white off the slide), rounded once rather
    than after each of Pillow's two passes, so a value may differ from `_resample_direct`'s
    by one. Only one block of at most REDUCE_BLOCK_PIXELS (or one of the file's tiles, if
    larger) is held at a time, plus the output's sums.
    """
    ry, rx = rows.bounds(), cols.bounds()
    oy, ox = np.clip(ry, 0, rows.length), np.clip(rx, 0, cols.length)  # the footprints' parts on the slide
    sums = np.zeros((len(ry) - 1, len(rx) - 1, 3), np.float64)
    th, tw = slide.tile_shapes[level]
    top, bottom, left, right = int(oy[0]), int(oy[-1]), int(ox[0]), int(ox[-1])
    if bottom > top and right > left:
        if th * (right - left) <= REDUCE_BLOCK_PIXELS:  # bands of whole rows of tiles
            bw, bh = right - left, max(th, REDUCE_BLOCK_PIXELS // (right - left) // th * th)
        else:  # blocks of tiles
            bh, bw = th, max(tw, REDUCE_BLOCK_PIXELS // th // tw * tw)
        for r0, r1 in _aligned(top, bottom, bh):
            ys = np.clip(oy, r0, r1) - r0
            ia, ib = _groups(ys)
            for q0, q1 in _aligned(left, right, bw):
                xs = np.clip(ox, q0, q1) - q0
                ja, jb = _groups(xs)
                block = slide.region(level, (q0, r0, q1 - q0, r1 - r0))
                # one sum per footprint row (a loop of sums is ~50x faster than reduceat along axis 0)
                part = np.stack(
                    [block[a:b].sum(axis=0, dtype=np.uint32) for a, b in itertools.pairwise(ys[ia : ib + 1])]
                )
                sums[ia:ib, ja:jb] += np.add.reduceat(part, xs[ja:jb], axis=1, dtype=np.uint64)
                del block, part
    out = np.empty(sums.shape, np.uint8)
    for a in range(0, len(sums), 256):  # means a band of output rows at a time: few temporaries
        total = np.outer(np.diff(ry[a : a + 257]), np.diff(rx)).astype(np.float64)  # white pixels included
        white = total - np.outer(np.diff(oy[a : a + 257]), np.diff(ox))
        band = sums[a : a + 256]
        band += BACKGROUND * white[..., None]
        band /= np.maximum(total, 1)[..., None]
        out[a : a + 256] = np.floor(band + 0.5)
    return out


def _aligned(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) cut at the multiples of `step`, so that blocks keep to the file's tiles."""
    cuts = [start, *range((start // step + 1) * step, stop, step), stop]
    return list(itertools.pairwise(cuts))


def _groups(starts: np.ndarray) -> tuple[int, int]:
    """The output pixels [a, b) whose footprints (from `starts`, clipped to one block) are not empty."""
    nonempty = np.flatnonzero(np.diff(starts) > 0)
    return int(nonempty[0]), int(nonempty[-1]) + 1


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
