"""The tile pipeline for instance models: every nucleus kept in exactly one tile, ids unique over the slide.

Objects cannot be blended like probabilities, so tiles overlap by a halo larger
than an object and each tile keeps only the objects whose centre lies in its
*core*: the part of the tile nearer to it than to any neighbour (the overlaps are
cut in the middle). An object whose centre is in a core lies whole in that tile,
so it is seen uncut; its neighbour tile, which sees it too, drops it. Kept objects
are numbered in tile order and pasted into a band of rows one tile high; rows no
later tile can touch are resampled (nearest) to the output grid and written.

A resumed run restarts at the first tile row that reaches the first unwritten
row, with the ids that row had: the model sees the same tiles, so the rows
written again are identical and nothing is numbered twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage

from ..io import Slide
from ..models.instances import TileInstances
from .engine import (
    PREFETCH_BATCHES,
    Laps,
    Progress,
    RunStats,
    StageClocks,
    _Counter,
    _Stage,
    default_readers,
    read_ahead,
)
from .errors import SegmentError
from .plan import GridTile, Plan, slide_mpp


@dataclass
class Nucleus:
    """One object as the run found it, in level-0 pixels (centroid) and um2 (area)."""

    id: int
    cls: int  # index into the model's classes
    score: float
    x: float  # centroid, level-0 pixels
    y: float
    area_um2: float
    polygon: object | None = None  # shapely outline in level-0 pixels, when asked for


class InstanceSink(Protocol):
    rows_done: int  # output rows already final

    def start(self, row: int) -> tuple[int, int]:
        """Where a run (re)starts, at tile row `row` or an earlier one it recorded (restarting earlier is always
        safe): forget what tile rows from there on added, and return (that row, its first id)."""
        ...

    def finished_ids(self, rows: tuple[int, int], cols: tuple[int, int], below: int) -> np.ndarray | None:
        """Output rows [rows) x columns [cols) as written, keeping only ids below `below` (None: not kept)."""
        ...

    def begin_row(self, row: int, next_id: int) -> None:
        """Tile row `row` starts with id `next_id` (recorded so a resume can restart at it)."""
        ...

    def add(self, nuclei: list[Nucleus]) -> None: ...

    def write(self, y: int, rows: np.ndarray) -> None:
        """Output rows [y, y + n) of object ids."""
        ...

    def flush(self) -> None: ...


class Cores:
    """Each tile's core on the working grid: overlaps cut at their middle, the outer tiles reaching the edges."""

    def __init__(self, plan: Plan) -> None:
        height, width = plan.work_shape
        self.y_cuts = _cuts(sorted({t.y for t in plan.tiles}), plan.tile, height)
        self.x_cuts = _cuts(sorted({t.x for t in plan.tiles}), plan.tile, width)

    def of(self, tile: GridTile) -> tuple[float, float, float, float]:
        """y0, y1, x0, x1 of the tile's core (working pixels, half-open)."""
        y0, y1 = self.y_cuts[tile.y]
        x0, x1 = self.x_cuts[tile.x]
        return y0, y1, x0, x1


def _cuts(starts: list[int], tile: int, length: int) -> dict[int, tuple[float, float]]:
    cuts = {}
    for i, s in enumerate(starts):
        lo = 0.0 if i == 0 else (starts[i - 1] + tile + s) / 2
        hi = float(length) if i == len(starts) - 1 else (s + tile + starts[i + 1]) / 2
        cuts[s] = (lo, hi)
    return cuts


def owned(
    found: TileInstances, tile: GridTile, core: tuple[float, float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The tile's objects whose centre lies in `core`: their local ids, centroids (y, x, working px) and pixel counts."""
    labels = np.asarray(found.labels)
    n = found.count
    if n == 0:
        empty = np.zeros(0)
        return empty.astype(np.int64), empty, empty, empty.astype(np.int64)
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs].astype(np.int64)
    if ids.size and (ids.max() > n or ids.min() < 1):
        raise SegmentError(f"the model gave label {int(ids.max())} for a tile with {n} objects")
    count = np.bincount(ids, minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(ids, ys + 0.5, minlength=n + 1)[1:] / count + tile.y
        cx = np.bincount(ids, xs + 0.5, minlength=n + 1)[1:] / count + tile.x
    y0, y1, x0, x1 = core
    keep = (count > 0) & (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)
    local = np.flatnonzero(keep) + 1
    return local, cy[keep], cx[keep], count[keep]


class Band:
    """Object ids of the working rows [top, top + tile), pasted tile by tile; first object at a pixel wins."""

    def __init__(self, tile: int, width: int, height: int, top: int) -> None:
        self.tile, self.width, self.height, self.top = tile, width, height, top
        self.rows = np.zeros((tile, width), np.uint32)

    def taken(self, y: int, x: int, local: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Per local id 1..n of a tile at working (y, x): its pixels inside the region, and how many of them
        objects already pasted hold."""
        h, w = min(local.shape[0], self.height - y), min(local.shape[1], self.width - x)
        if h <= 0 or w <= 0:
            return np.zeros(n, np.int64), np.zeros(n, np.int64)
        self._check(y, h)
        new = local[:h, :w]
        view = self.rows[y - self.top : y - self.top + h, x : x + w]
        inside = np.bincount(new.ravel(), minlength=n + 1)[1:]
        under = np.bincount(new[view != 0], minlength=n + 1)[1:]
        return inside, under

    def paste(self, y: int, x: int, ids: np.ndarray) -> None:
        """`ids` (tile-sized, 0 = nothing) with its corner at working (y, x); clipped to the region."""
        h = min(ids.shape[0], self.height - y)
        w = min(ids.shape[1], self.width - x)
        if h <= 0 or w <= 0:
            return
        self._check(y, h)
        view = self.rows[y - self.top : y - self.top + h, x : x + w]
        new = ids[:h, :w]
        free = (view == 0) & (new != 0)
        view[free] = new[free]

    def _check(self, y: int, h: int) -> None:
        if y < self.top or y + h > self.top + self.tile:
            raise RuntimeError(f"tile at row {y} outside the band [{self.top}, {self.top + self.tile})")

    def release(self, until: int) -> tuple[int, np.ndarray]:
        """Rows [top, until) are final: hand them over and move the band down."""
        until = min(until, self.height)
        n = until - self.top
        if n <= 0:
            return self.top, self.rows[:0]
        out = self.rows[:n].copy()
        self.rows[: self.tile - n] = self.rows[n:]
        self.rows[self.tile - n :] = 0
        start, self.top = self.top, until
        return start, out


class NearestRows:
    """Working rows to output rows by nearest neighbour: each output pixel takes the working pixel under its centre."""

    def __init__(self, work_shape: tuple[int, int], out_shape: tuple[int, int], ratio: float, first: int) -> None:
        (self.work_h, work_w), (self.out_h, out_w) = work_shape, out_shape
        self.ratio, self.next = ratio, first  # ratio: working pixels per output pixel
        self.cols = np.minimum(((np.arange(out_w) + 0.5) * ratio).astype(np.int64), work_w - 1)
        self.identity = out_shape == work_shape and ratio == 1

    def source_row(self, out_row: int) -> int:
        return min(int((out_row + 0.5) * self.ratio), self.work_h - 1)

    def first_work_row(self) -> int:
        """The first working row an unwritten output row needs (the working height when all are written)."""
        return self.source_row(self.next) if self.next < self.out_h else self.work_h

    def push(self, start: int, rows: np.ndarray) -> tuple[int, np.ndarray] | None:
        """Output rows whose source lies in working rows [start, start + len(rows)): (first output row, rows)."""
        end = start + len(rows)
        first = self.next
        j = first
        while j < self.out_h and self.source_row(j) < end:
            j += 1
        if j == first:
            return None
        self.next = j
        if self.identity:
            return first, rows[first - start : j - start]
        src = np.array([self.source_row(k) for k in range(first, j)]) - start
        if src.min() < 0:
            raise RuntimeError("output rows asked for working rows already released")
        return first, rows[src][:, self.cols]


def _refill(band: Band, rows: NearestRows, sink: InstanceSink, top: int, restart: int, first_id: int) -> None:
    """Put back into the band the working rows [top, restart) as earlier tile rows left them (ids below
    `first_id`), read from the output on disk: the objects pasted next are judged against the same pixels as in
    an uninterrupted run. Exact when the output is at least as fine as the working grid (each working pixel
    is some output pixel); on a coarser output the band starts empty there."""
    if rows.ratio > 1 or restart <= top:
        return
    out_rows = np.arange(rows.out_h)
    src = np.minimum(((out_rows + 0.5) * rows.ratio).astype(np.int64), rows.work_h - 1)
    wanted = np.arange(top, min(restart, band.height))
    j = np.searchsorted(src, wanted)  # the first output row showing each working row
    cols = np.searchsorted(rows.cols, np.arange(band.width))
    if j.size == 0 or j.max() >= rows.out_h or cols.max() >= rows.cols.size:
        return
    written = sink.finished_ids((int(j.min()), int(j.max()) + 1), (0, rows.cols.size), first_id)
    if written is None:
        return
    band.rows[: wanted.size] = written[j - j.min()][:, cols]


def run_instance_tiles(
    slide: Slide,
    segmenter,
    plan: Plan,
    sink: InstanceSink,
    *,
    polygons: bool = False,
    batch_size: int = 4,
    readers: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> RunStats:
    """Predict every tissue tile of `plan` whose rows are not yet in `sink`; keep, number and write its objects."""
    started = time.perf_counter()
    readers = readers or default_readers()
    ratio = plan.out_downsample / plan.scale
    rows = NearestRows(plan.work_shape, plan.out_shape, ratio, sink.rows_done)
    restart = rows.first_work_row()
    row_starts = plan.row_starts
    first_row = next((i for i, y in enumerate(row_starts) if y + plan.tile > restart), len(row_starts))
    first_row, next_id = sink.start(first_row)
    todo = [t for t in plan.tiles if t.row >= first_row]
    top = row_starts[first_row] if first_row < len(row_starts) else plan.work_shape[0]
    band = Band(plan.tile, plan.work_shape[1], plan.work_shape[0], top)
    if top < restart:  # a resume: the rows on disk hold objects of earlier tile rows that later ones must see
        _refill(band, rows, sink, top, restart, next_id)
    clocks = StageClocks()
    writer = _InstanceWriter(plan, band, rows, sink, todo, next_id, polygons, slide_mpp(slide), clocks)
    counter = _Counter(len(plan.tiles), len(plan.tiles) - len(todo), progress)
    counter.add(sum(not t.tissue for t in todo))
    kept = [t for t in todo if t.tissue]
    pool = ThreadPoolExecutor(readers, thread_name_prefix="nephro-read")
    batches = read_ahead(slide, plan, kept, batch_size, pool, cancel, clocks)
    predicted = 0
    writer.start()
    try:
        for batch, pixels in batches:
            t0 = time.perf_counter()
            found = segmenter.predict_instances(pixels)
            clocks.model.add(time.perf_counter() - t0)
            if len(found) != len(batch):
                raise SegmentError(f"the model gave {len(found)} results for {len(batch)} tiles")
            writer.put((batch, found))
            predicted += len(batch)
            counter.add(len(batch))
    finally:
        batches.close()
        ended = time.perf_counter()
        try:
            writer.close()
        finally:
            pool.shutdown(cancel_futures=True)
    return RunStats.measured(plan, predicted, predicted == len(kept), clocks, started, ended)


class _InstanceWriter(_Stage):
    """Keeps, numbers and pastes each tile's objects in grid order, off the model's thread, and writes final rows."""

    def __init__(self, plan, band, rows, sink, tiles, next_id, polygons, mpp, clocks: StageClocks) -> None:
        super().__init__("nephro-instances", PREFETCH_BATCHES)
        self.plan, self.band, self.rows, self.sink = plan, band, rows, sink
        self.tiles, self.next_id, self.polygons = list(tiles), next_id, polygons
        self.cores = Cores(plan)
        self.row_starts = plan.row_starts
        self.work_um2 = (mpp * plan.scale) ** 2
        self._next = 0  # index in self.tiles of the next tile to handle
        self._row = -1  # tile row last begun
        self.clocks, self.laps = clocks, Laps()  # stitch: this thread's own work; write: its calls into the sink

    def handle(self, item) -> None:
        self.laps.restart()
        batch, found = item
        for tile, result in zip(batch, found, strict=True):
            self._advance(until=tile)
            self._keep(tile, result)
            self._next += 1
        self.laps.to(self.clocks.stitch)

    def finish(self, failed: bool) -> None:
        self.laps.restart()
        try:
            if not failed:
                self._advance()
        finally:
            self._to_sink(self.sink.flush)

    def _to_sink(self, call, *args) -> None:
        """Call into the sink: the time before it is this thread's stitching, the call's is the write stage's."""
        self.laps.to(self.clocks.stitch)
        try:
            call(*args)
        finally:
            self.laps.to(self.clocks.write)

    def _advance(self, until: GridTile | None = None) -> None:
        """Pass glass tiles up to `until` (at the end: up to the first tile never predicted), beginning rows as
        they come; at the end of a complete run, release every row."""
        while self._next < len(self.tiles):
            tile = self.tiles[self._next]
            self._begin(tile.row)
            if tile is until:
                return
            if tile.tissue:
                if until is not None:
                    raise RuntimeError("tiles arrived out of grid order")
                return  # the run stopped early: this tile's rows stay unwritten
            self._next += 1
        if until is None:
            self._release(self.plan.work_shape[0])

    def _begin(self, row: int) -> None:
        if row == self._row:
            return
        self._release(self.row_starts[row])  # rows above this tile row are final
        self._to_sink(self.sink.begin_row, row, self.next_id)
        self._row = row

    def _release(self, until: int) -> None:
        start, released = self.band.release(until)
        if len(released):
            out = self.rows.push(start, released)
            if out is not None:
                self._to_sink(self.sink.write, *out)

    def _keep(self, tile: GridTile, found: TileInstances) -> None:
        local, cy, cx, count = owned(found, tile, self.cores.of(tile))
        if local.size == 0:
            return
        labels = np.asarray(found.labels)
        # a model that sees each tile in its own context (per-tile normalisation) may place a nucleus by a
        # core's edge a little differently in two tiles, and both keep it: the second copy, mostly under the
        # first, is dropped; what is left of a kept one is what the table measures
        inside, under = self.band.taken(tile.y, tile.x, labels, found.count)
        free = inside[local - 1] - under[local - 1]
        keep = (under[local - 1] * 2 <= inside[local - 1]) & (free > 0)
        local, cy, cx, count = local[keep], cy[keep], cx[keep], free[keep]
        if local.size == 0:
            return
        lut = np.zeros(found.count + 1, np.uint32)
        ids = np.arange(self.next_id, self.next_id + local.size, dtype=np.uint32)
        lut[local] = ids
        self.band.paste(tile.y, tile.x, lut[labels])
        x0, y0, _, _ = self.plan.region
        s = self.plan.scale
        shapes = self._outlines(tile, labels, local) if self.polygons else [None] * local.size
        nuclei = [
            Nucleus(
                int(i),
                int(found.classes[k - 1]),
                float(found.scores[k - 1]),
                x0 + float(x) * s,
                y0 + float(y) * s,
                float(n) * self.work_um2,
                shape,
            )
            for i, k, y, x, n, shape in zip(ids, local, cy, cx, count, shapes, strict=True)
        ]
        self._to_sink(self.sink.add, nuclei)
        self.next_id += local.size

    def _outlines(self, tile: GridTile, labels: np.ndarray, local: np.ndarray) -> list:
        """Pixel-edge outlines of the kept objects, in level-0 pixels."""
        from ..annotations.raster import pixel_outline

        x0, y0, _, _ = self.plan.region
        s = self.plan.scale
        slices = ndimage.find_objects(labels)
        shapes = []
        for k in local:
            sl = slices[k - 1]
            mask = labels[sl] == k
            corner = (x0 + (tile.x + sl[1].start) * s, y0 + (tile.y + sl[0].start) * s)
            shapes.append(pixel_outline(mask, scale=s, origin=corner))
        return shapes
