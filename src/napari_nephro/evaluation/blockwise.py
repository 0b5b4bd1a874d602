"""Label statistics gathered block by block, so no whole-slide raster is ever in memory.

Anything 2-D that slices (numpy, zarr, dask, or polygons drawn on demand) is read
one block at a time; what is kept between blocks is per object (areas, boxes) or
per overlapping pair of objects, never per pixel. Sums of counts do not depend on
the blocking, so the results equal those of one pass over the whole image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from scipy import ndimage

T = TypeVar("T")
R = TypeVar("R")

BLOCK = 2048  # pixels a side: a few tens of MB of temporaries per block


def blocks(shape: tuple[int, int], size: int = BLOCK) -> Iterator[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of the blocks covering `shape`, row by row."""
    height, width = shape
    for y0 in range(0, height, size):
        for x0 in range(0, width, size):
            yield y0, min(y0 + size, height), x0, min(x0 + size, width)


def workers() -> int:
    """Threads for block work: numpy releases the GIL in the heavy parts, so two cores nearly halve the time."""
    return max(1, min(4, os.cpu_count() or 1))


def parallel_map(func: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> Iterator[R]:
    """`map(func, items)` on a few threads, in order. Each call reads its own block, so `threads` blocks
    are held at a time; what the calls return (counts, boxes) is small."""
    threads = workers() if threads is None else threads
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        yield from map(func, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        yield from pool.map(func, items)


def read_block(array, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Pixels [y0:y1, x0:x1] of a numpy, zarr or dask array (or anything that slices like one), as numpy."""
    block = array[y0:y1, x0:x1]
    if hasattr(block, "compute"):  # dask: the blocks are already spread over threads here
        block = block.compute(scheduler="synchronous")
    return np.asarray(block)


class PairCounts:
    """Pixels per (truth value, prediction value) pair, background 0 included, summed over blocks.

    One joint histogram per block is all the per-pixel work an evaluation needs:
    object areas, overlaps, foreground agreement and (through each value's class)
    the class scores all follow from these few cells, one per pair that occurs.
    """

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._merged = None

    def add(self, truth: np.ndarray, pred: np.ndarray) -> None:
        self.add_cells(block_cells(truth, pred))

    def add_cells(self, cells: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Counts of one block as `block_cells` made them (e.g. on another thread)."""
        self._parts.append(cells)
        self._merged = None
        if len(self._parts) > 64:  # keep what is held proportional to the pairs, not to the blocks
            self._parts = [self.cells()]

    def cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(truth values, prediction values, pixels) of every pair that occurs, sorted by (truth, prediction)."""
        if self._merged is None:
            if not self._parts:
                empty = np.zeros(0, np.int64)
                self._merged = (empty, empty, empty)
            else:
                t, p, n = (np.concatenate(a) for a in zip(*self._parts, strict=True))
                order = np.lexsort((p, t))
                t, p, n = t[order], p[order], n[order]
                start = np.flatnonzero(np.r_[True, (t[1:] != t[:-1]) | (p[1:] != p[:-1])])
                self._merged = (t[start], p[start], np.add.reduceat(n, start) if len(n) else n)
        return self._merged

    def foreground(self) -> tuple[int, int, int]:
        """(TP, FP, FN) pixels of foreground (any non-zero value) against foreground."""
        t, p, n = self.cells()
        return int(n[(t != 0) & (p != 0)].sum()), int(n[(t == 0) & (p != 0)].sum()), int(n[(t != 0) & (p == 0)].sum())

    def table(self):
        """(true ids, their areas, prediction ids, their areas, truth index, prediction index, intersection).

        Ids are the sorted non-zero values; the pairs (both non-zero) are sorted by
        (truth id, prediction id) and index into the id arrays.
        """
        t, p, n = self.cells()
        true_ids, t_area = _marginal(t, n)
        pred_ids, p_area = _marginal(p, n)
        both = (t != 0) & (p != 0)
        ti = np.searchsorted(true_ids, t[both])
        pi = np.searchsorted(pred_ids, p[both])
        return true_ids, t_area, pred_ids, p_area, ti, pi, n[both]


def _marginal(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-zero values and their total pixels."""
    ids, inverse = np.unique(values, return_inverse=True)
    totals = np.bincount(inverse, weights=counts, minlength=len(ids)).astype(np.int64)
    keep = ids != 0
    return ids[keep].astype(np.int64), totals[keep]


def block_cells(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth values, prediction values, pixels) of the distinct pairs in one block of two label images."""
    return joint_cells(_as_ids(truth).ravel(), _as_ids(pred).ravel())


def joint_cells(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth values, prediction values, pixels) of the distinct pairs of two flat label arrays."""
    t_ids, t_c = _compact(t)
    p_ids, p_c = _compact(p)
    width = len(p_ids)
    if len(t_ids) * width <= max(4 * t.size, 1 << 20):  # a dense histogram: one pass
        key = t_c.astype(np.intp) * width
        key += p_c
        hist = np.bincount(key, minlength=len(t_ids) * width)
        cells = np.flatnonzero(hist)
        counts = hist[cells]
    else:
        cells, counts = np.unique(t_c.astype(np.int64) * width + p_c, return_counts=True)
    ti, pi = np.divmod(cells, width)
    return t_ids[ti].astype(np.int64), p_ids[pi].astype(np.int64), counts.astype(np.int64)


def _compact(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values (sorted) and each element's index among them."""
    if values.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.intp)
    low, top = int(values.min()), int(values.max())
    if low >= 0 and top < max(1 << 16, 4 * values.size):  # small values: present ones by a lookup table
        if top < 256 and values.dtype.itemsize == 1:
            return np.arange(top + 1), values  # uint8 labels: their own index (absent values give empty cells)
        present = np.zeros(top + 1, bool)
        present[values] = True
        ids = np.flatnonzero(present)
        lookup = np.zeros(top + 1, np.int32)
        lookup[ids] = np.arange(len(ids), dtype=np.int32)
        return ids, lookup[values]
    ids, inverse = np.unique(values, return_inverse=True)
    return ids, inverse.ravel()


class ObjectBoxes:
    """The bounding box of each non-zero id, over any number of blocks at their offsets."""

    def __init__(self) -> None:
        self._boxes: dict[int, list[int]] = {}  # id -> [y0, y1, x0, x1]

    def add(self, labels: np.ndarray, y0: int, x0: int) -> None:
        labels = _as_ids(labels)
        inside = labels != 0
        if not inside.any():
            return
        values = labels[inside]
        ids = np.unique(values)
        compact = np.zeros(labels.shape, np.int32 if len(ids) < 2**31 else np.int64)
        compact[inside] = np.searchsorted(ids, values) + 1  # 1..n in id order, background 0
        for value, sl in zip(ids.tolist(), ndimage.find_objects(compact), strict=True):
            box = [sl[0].start + y0, sl[0].stop + y0, sl[1].start + x0, sl[1].stop + x0]
            old = self._boxes.get(value)
            if old is None:
                self._boxes[value] = box
            else:
                old[0], old[1] = min(old[0], box[0]), max(old[1], box[1])
                old[2], old[3] = min(old[2], box[2]), max(old[3], box[3])

    def merge(self, other: ObjectBoxes) -> None:
        """Take in the boxes another instance gathered (from other blocks)."""
        for value, box in other._boxes.items():
            old = self._boxes.get(value)
            if old is None:
                self._boxes[value] = list(box)
            else:
                old[0], old[1] = min(old[0], box[0]), max(old[1], box[1])
                old[2], old[3] = min(old[2], box[2]), max(old[3], box[3])

    def boxes(self) -> dict[int, tuple[int, int, int, int]]:
        """id -> (y0, y1, x0, x1), in increasing id order."""
        return {k: tuple(self._boxes[k]) for k in sorted(self._boxes)}


def grown_box(box: tuple[int, int, int, int], margin: float, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """A (y0, y1, x0, x1) box grown by `margin` of its size on every side, clipped to the image."""
    y0, y1, x0, x1 = box
    dy, dx = round(margin * (y1 - y0)), round(margin * (x1 - x0))
    return max(0, y0 - dy), min(shape[0], y1 + dy), max(0, x0 - dx), min(shape[1], x1 + dx)


class BoxCounts:
    """Foreground agreement (TP, FP, FN pixels) inside fixed boxes, over any number of blocks."""

    def __init__(self, boxes: list[tuple[int, int, int, int]]) -> None:
        self.boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
        self.counts = np.zeros((len(self.boxes), 3), np.int64)

    def wants(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Indices of the boxes that meet this block."""
        b = self.boxes
        return np.flatnonzero((b[:, 0] < y1) & (b[:, 1] > y0) & (b[:, 2] < x1) & (b[:, 3] > x0))

    def count(self, pred_fg: np.ndarray, truth_fg: np.ndarray, y0: int, x0: int, which: np.ndarray) -> np.ndarray:
        """(TP, FP, FN) inside each box `which` of one block whose corner is at (y0, x0); thread-safe."""
        h, w = pred_fg.shape
        out = np.zeros((len(which), 3), np.int64)
        for row, k in enumerate(which):
            by0, by1, bx0, bx1 = self.boxes[k]
            sl = (slice(max(by0 - y0, 0), min(by1 - y0, h)), slice(max(bx0 - x0, 0), min(bx1 - x0, w)))
            p, t = pred_fg[sl], truth_fg[sl]
            tp = np.count_nonzero(p & t)
            out[row] = (tp, np.count_nonzero(p) - tp, np.count_nonzero(t) - tp)
        return out

    def add(self, which: np.ndarray, counts: np.ndarray) -> None:
        """Take in what `count` found for the boxes `which`."""
        np.add.at(self.counts, which, counts)


def _as_ids(labels: np.ndarray) -> np.ndarray:
    """Integer labels as they are; bool and float become int64 (floats must hold whole numbers)."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "ui":
        return labels
    return labels.astype(np.int64)
