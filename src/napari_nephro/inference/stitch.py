"""Seamless stitching of overlapping tile predictions, streamed row band by row band.

Each tile's probabilities are weighted by a window that is 1 in its middle and falls
smoothly (sin^2) to nearly 0 across the overlap, so where two tiles overlap their
weights sum to one and the result slides from one tile's opinion to the other's
with no step. Rows are released as soon as no later tile can touch them, which keeps
memory at one band of tiles whatever the slide's size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

WINDOW_FLOOR = 1e-3  # a tile alone at the region's edge still counts


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """(tile, tile) float32 weights: the outer product of a 1-D ramp that is 1 away from the overlaps."""
    ramp = np.ones(tile, np.float32)
    if overlap:
        rise = np.sin(np.pi / 2 * (np.arange(overlap) + 0.5) / overlap) ** 2
        ramp[:overlap] = np.minimum(ramp[:overlap], rise)
        ramp[tile - overlap :] = np.minimum(ramp[tile - overlap :], rise[::-1])
    ramp = np.maximum(ramp, WINDOW_FLOOR)
    return np.outer(ramp, ramp)


class RowStitcher:
    """Weighted sums of tile probabilities over a band of working-grid rows.

    `add` tiles in grid order; `release(y)` hands back the normalised rows above
    `y` once every tile touching them has been added. Pixels no tile covered (glass
    that was skipped) are background. The band is allocated once, one tile high
    (rows above a tile row are released before it starts), and rows move up in place.
    """

    def __init__(self, shape: tuple[int, int], channels: int, tile: int, overlap: int, top: int = 0) -> None:
        self.height, self.width = shape
        self.channels, self.tile = channels, tile
        self.window = blend_window(tile, overlap)
        self.top = top  # first row held
        width = max(self.width, tile)  # a region narrower than a tile still takes whole tiles
        self._sum = np.zeros((channels, tile, width), np.float32)
        self._weight = np.zeros((tile, width), np.float32)

    def add(self, y: int, x: int, probs: np.ndarray) -> None:
        r, t = y - self.top, self.tile
        if r < 0 or r + t > self._weight.shape[0]:
            raise ValueError(f"tile at row {y} is outside the held band starting at row {self.top}")
        self._sum[:, r : r + t, x : x + t] += probs * self.window
        self._weight[r : r + t, x : x + t] += self.window

    def release(self, upto: int) -> tuple[int, np.ndarray]:
        """(first row, probabilities (C, rows, width)) of rows [top, upto), now final, then forgotten.

        Rows below the held band (a row of tiles that were all glass) were touched by
        no tile: they are background.
        """
        upto = min(max(upto, self.top), self.height)
        n = upto - self.top
        held = min(n, self._weight.shape[0])
        probs = np.zeros((self.channels, n, self.width), np.float32)
        weight = self._weight[:held, : self.width]
        covered = np.zeros((n, self.width), bool)
        covered[:held] = weight > 0
        np.divide(self._sum[:, :held, : self.width], weight, out=probs[:, :held], where=covered[:held])
        if self.channels > 1:
            np.copyto(probs[0], 1, where=~covered)  # background channel
        start, self.top = self.top, upto
        for band in (self._sum, self._weight[None]):  # move the rest up, clear the freed rows
            height = band.shape[1]
            for y in range(0, height - held, held or 1):  # in steps of `held` rows: no overlap, no temporary
                m = min(held, height - held - y)
                band[:, y : y + m] = band[:, y + held : y + held + m]
            band[:, max(0, height - held) :] = 0
        return start, probs


def _linear_taps(n_out: int, n_in: int, ratio: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of linear interpolation from n_in to n_out pixels (pixel centres aligned)."""
    t = (np.arange(n_out) + 0.5) * ratio - 0.5
    t = np.clip(t, 0, n_in - 1)
    i0 = np.floor(t).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (t - i0).astype(np.float32)


class RowResampler:
    """Linear resampling of released working rows onto the output grid, row band by row band.

    An output row needs two working rows, so it is emitted only once both are
    released; the working rows no later output row needs are dropped. Results come
    in blocks of at most ROW_BLOCK rows, so a 100k-pixel-wide slide
    never needs a band of level-0 floats in memory. On the working grid itself
    (ratio 1, the default for a whole slide) rows are passed on as they are: no
    interpolation, no copy.
    """

    ROW_BLOCK = 128
    COLUMN_BLOCK = 4096

    def __init__(
        self, work_shape: tuple[int, int], out_shape: tuple[int, int], ratio: float, first: int = 0, pool=None
    ) -> None:
        self.pool = pool  # an Executor to resample column blocks in parallel (Pillow releases the GIL)
        (self.work_h, self.work_w), (self.out_h, self.out_w) = work_shape, out_shape
        self.ratio = ratio  # working pixels per output pixel
        self.y0, self.y1, self.yw = _linear_taps(self.out_h, self.work_h, ratio)
        self.x0, self.x1, self.xw = _linear_taps(self.out_w, self.work_w, ratio)
        # Pillow's bilinear resize is this interpolation, 8x faster, when upsampling inside the image
        self.fast = ratio <= 1 and self.out_w * ratio <= self.work_w and self.out_h * ratio <= self.work_h
        self.identity = ratio == 1 and tuple(out_shape) == tuple(work_shape)
        self.next = first  # next output row to emit
        self._rows: np.ndarray | None = None  # held working rows
        self._top = 0  # working row index of self._rows[:, 0]

    def first_work_row(self) -> int:
        """The first working row the remaining output rows need (where a resumed run restarts)."""
        return int(self.y0[self.next]) if self.next < self.out_h else self.work_h

    def push(self, start: int, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Take working rows [start, start + n); yield (first output row, probabilities) that became computable."""
        if self.identity:  # output row i is working row i: hand over the rows not yet emitted, as views
            stop = start + rows.shape[1]
            for a in range(max(self.next, start), stop, self.ROW_BLOCK):
                b = min(a + self.ROW_BLOCK, stop)
                yield a, rows[:, a - start : b - start]
            self.next = max(self.next, stop)
            return
        if self._rows is None or self._rows.shape[1] == 0:
            self._rows, self._top = rows, start
        else:
            self._rows = np.concatenate([self._rows, rows], axis=1)
        available = self._top + self._rows.shape[1]
        stop = max(self.next, int(np.searchsorted(self.y1, available)))  # rows whose lower tap is held
        for a in range(self.next, stop, self.ROW_BLOCK):
            b = min(a + self.ROW_BLOCK, stop)
            yield a, self._resample(a, b)
        self.next = stop
        keep_from = self.first_work_row() - self._top
        if keep_from > 0:
            self._rows = self._rows[:, keep_from:]
            self._top += keep_from

    def _resample(self, a: int, b: int) -> np.ndarray:
        out = np.empty((self._rows.shape[0], b - a, self.out_w), np.float32)

        def fill(c0: int) -> None:
            c1 = min(c0 + self.COLUMN_BLOCK, self.out_w)
            out[:, :, c0:c1] = self._block_fast(a, b, c0, c1) if self.fast else self._block(a, b, c0, c1)

        starts = range(0, self.out_w, self.COLUMN_BLOCK)
        if self.pool is None or len(starts) == 1:
            for c0 in starts:
                fill(c0)
        else:
            for future in [self.pool.submit(fill, c0) for c0 in starts]:
                future.result()
        return out

    def _block_fast(self, a: int, b: int, c0: int, c1: int) -> np.ndarray:
        from PIL import Image

        r = self.ratio
        # the held rows and columns this block reads, with a margin: Pillow copies what it is given
        ya, yb = max(0, int(a * r) - self._top - 2), min(self._rows.shape[1], int(b * r) - self._top + 3)
        xa, xb = max(0, int(c0 * r) - 2), min(self.work_w, int(c1 * r) + 3)
        box = (c0 * r - xa, a * r - self._top - ya, c1 * r - xa, b * r - self._top - ya)  # block edges, in the crop
        size = (c1 - c0, b - a)
        return np.stack(
            [
                np.asarray(Image.fromarray(channel[ya:yb, xa:xb]).resize(size, Image.Resampling.BILINEAR, box=box))
                for channel in self._rows
            ]
        )

    def _block(self, a: int, b: int, c0: int, c1: int) -> np.ndarray:
        held, wy = self._rows, self.yw[a:b, None]
        rows = held[:, self.y0[a:b] - self._top] * (1 - wy) + held[:, self.y1[a:b] - self._top] * wy
        wx = self.xw[c0:c1]
        return rows[:, :, self.x0[c0:c1]] * (1 - wx) + rows[:, :, self.x1[c0:c1]] * wx


def to_labels(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class ids (0 background, 1.. classes) from (C, H, W) probabilities.

    One channel: foreground where p >= threshold. Several (background first): a pixel
    is foreground where 1 - p(background) >= threshold, and takes its likeliest class.
    """
    if probs.shape[0] == 1:
        return (probs[0] >= threshold).astype(np.uint8)
    foreground = (1 - probs[0]) >= threshold
    classes = np.argmax(probs[1:], axis=0).astype(np.uint8) + 1
    return np.where(foreground, classes, 0).astype(np.uint8)
