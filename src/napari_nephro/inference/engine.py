"""The tile pipeline: readers ahead of the model, the model on full batches, stitching behind it.

Four kinds of thread share the work. A pool of readers decodes and resamples the
tiles of the next batches; the calling thread runs the model, batch after batch;
a stitching thread blends tiles and resamples finished rows to the output grid
(column blocks on the reader pool), and a sink thread turns them into labels and
writes them. Queues between them are short, so memory holds a few batches
whatever the slide's size, and a fast GPU is kept fed by several CPU cores.
Cancellation is checked between batches; what was finished is flushed either way.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..io import Slide
from ..tiling import READ_BLOCK_PIXELS, REDUCE_BLOCK_PIXELS, read_scaled
from .errors import SegmentError
from .output import Sink
from .plan import GridTile, Plan
from .stitch import RowResampler, RowStitcher

PREFETCH_BATCHES = 2


@dataclass
class Progress:
    """What a progress bar shows: tiles done of total (glass tiles count as done), speed and time left."""

    done: int
    total: int
    tiles_per_second: float
    eta_seconds: float | None


@dataclass
class RunStats:
    """What a run did and where its time went (seconds; the stages overlap in threads, so they need not add up)."""

    tiles: int  # in the plan
    skipped: int  # glass, never sent to the model
    predicted: int  # sent to the model in this call
    seconds: float
    model_seconds: float  # inside `predict`
    complete: bool
    read_seconds: float = 0.0  # decoding and resampling tiles, summed over the reader threads
    wait_seconds: float = 0.0  # the model's thread waiting for tiles: reading the model did not hide
    stitch_seconds: float = 0.0  # the writer thread's own work (tiles into rows, resampling, ids), not the sink's
    write_seconds: float = 0.0  # inside the sink: object rules, compression, disk
    tail_seconds: float = 0.0  # after the last batch: stitching and writing still to finish

    @classmethod
    def measured(
        cls, plan: Plan, predicted: int, complete: bool, clocks: StageClocks, started: float, ended: float
    ) -> RunStats:
        """The stats of a run that began at `started` and fed its last batch at `ended` (perf_counter)."""
        now = time.perf_counter()
        return cls(
            len(plan.tiles),
            plan.skipped,
            predicted,
            now - started,
            clocks.model.seconds,
            complete,
            read_seconds=clocks.read.seconds,
            wait_seconds=clocks.wait.seconds,
            stitch_seconds=clocks.stitch.seconds,
            write_seconds=clocks.write.seconds,
            tail_seconds=now - ended,
        )

    def shares(self) -> dict[str, float]:
        """Each stage's time as a share of the run's: what a benchmark prints."""
        total = self.seconds or 1.0
        parts = {
            "read": self.read_seconds,
            "wait": self.wait_seconds,
            "model": self.model_seconds,
            "stitch": self.stitch_seconds,
            "write": self.write_seconds,
            "tail": self.tail_seconds,
        }
        return {k: v / total for k, v in parts.items()}


class StageClock:
    """Seconds summed over the threads of one stage (a lock per addition: a few per tile, nothing to the run)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds


@dataclass
class StageClocks:
    """A run's clocks, one per stage: both engines fill them the same way, so their stats mean the same."""

    read: StageClock = field(default_factory=StageClock)
    wait: StageClock = field(default_factory=StageClock)
    model: StageClock = field(default_factory=StageClock)
    stitch: StageClock = field(default_factory=StageClock)
    write: StageClock = field(default_factory=StageClock)


class Laps:
    """One thread's time cut into stretches, each added to one stage's clock or to none (a wait): never twice."""

    def __init__(self) -> None:
        self.mark = time.perf_counter()

    def restart(self) -> None:
        """Begin a stretch (after a wait for work that no stage should count)."""
        self.mark = time.perf_counter()

    def to(self, clock: StageClock | None) -> None:
        """The stretch since the last mark goes to `clock` (None: to no stage)."""
        now = time.perf_counter()
        if clock is not None:
            clock.add(now - self.mark)
        self.mark = now


class _Stop(Exception):
    """The writer failed: stop feeding it."""


def run_tiles(
    slide: Slide,
    segmenter,
    plan: Plan,
    sink: Sink,
    *,
    batch_size: int = 4,
    readers: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> RunStats:
    """Predict every tissue tile of `plan` not yet in `sink`, stitch, and write rows to `sink` in order."""
    started = time.perf_counter()
    channels = channels_of(segmenter)
    stitcher_rows = plan.work_shape
    readers = readers or default_readers()
    pool = ThreadPoolExecutor(readers, thread_name_prefix="nephro-read")
    ratio = plan.out_downsample / plan.scale
    resampler = RowResampler(plan.work_shape, plan.out_shape, ratio, first=sink.rows_done, pool=pool)
    restart = resampler.first_work_row()
    row_starts = plan.row_starts
    first_row = next((i for i, y in enumerate(row_starts) if y + plan.tile > restart), len(row_starts))
    todo = [t for t in plan.tiles if t.row >= first_row]
    already = len(plan.tiles) - len(todo)
    top = row_starts[first_row] if first_row < len(row_starts) else stitcher_rows[0]
    stitcher = RowStitcher(stitcher_rows, channels, plan.tile, plan.overlap, top=min(top, restart))
    clocks = StageClocks()
    writer = _Writer(stitcher, resampler, sink, todo, row_starts, clocks)
    counter = _Counter(len(plan.tiles), already, progress)
    counter.add(sum(not t.tissue for t in todo))  # glass is done as soon as it is known to be glass
    predicted = 0
    kept = [t for t in todo if t.tissue]
    batches = read_ahead(slide, plan, kept, batch_size, pool, cancel, clocks)
    writer.start()
    try:
        for batch, pixels in batches:
            t0 = time.perf_counter()
            probs = _predict(segmenter, pixels)
            clocks.model.add(time.perf_counter() - t0)
            writer.put((batch, probs))
            predicted += len(batch)
            counter.add(len(batch))
    finally:
        batches.close()  # tiles read ahead of a stop are dropped
        ended = time.perf_counter()
        try:
            writer.close()  # stitches what was handed over, with the pool's help
        finally:
            pool.shutdown(cancel_futures=True)
    return RunStats.measured(plan, predicted, predicted == len(kept), clocks, started, ended)


def read_ahead(
    slide: Slide,
    plan: Plan,
    tiles: list[GridTile],
    batch_size: int,
    pool: ThreadPoolExecutor,
    cancel: Callable[[], bool] | None,
    clocks: StageClocks,
) -> Generator[tuple[list[GridTile], np.ndarray], None, None]:
    """Batches of `tiles` and their pixels, in order, read by `pool` PREFETCH_BATCHES batches ahead of the model.

    Stops early when `cancel()` says so (checked before each batch); closing the
    generator drops what was read ahead. Both engines feed their models from it.
    `clocks`: its read and wait clocks get the readers' seconds and the caller's wait for them.
    """
    batches = [tiles[i : i + batch_size] for i in range(0, len(tiles), batch_size)]
    pending: deque[tuple[list[GridTile], list[Future]]] = deque()
    next_batch = 0
    try:
        while next_batch < len(batches) or pending:
            while next_batch < len(batches) and len(pending) < PREFETCH_BATCHES:
                batch = batches[next_batch]
                pending.append((batch, [pool.submit(_timed_read, slide, plan, t, clocks.read) for t in batch]))
                next_batch += 1
            if cancel is not None and cancel():
                return
            batch, futures = pending.popleft()
            t0 = time.perf_counter()
            pixels = np.stack([f.result() for f in futures])
            clocks.wait.add(time.perf_counter() - t0)
            yield batch, pixels
    finally:
        for _, futures in pending:
            for f in futures:
                f.cancel()


MAX_RUN_BYTES = 8 * 1024**3  # what a run may hold besides the model: a 16 GB laptop still has room for it


def memory_needed(
    plan: Plan, channels: int, batch_size: int, readers: int, level_ratio: float = 1.0, held_rows: int = 0
) -> dict:
    """Bytes a run holds at its peak besides the model, by part: what depends on the tiles, and on the width.

    Whatever the slide's size this is a few tiles and one band a tile high, so only
    absurd tiles, batches or scales make it large; they are refused before anything is read.
    `level_ratio`: pixels read at the slide level per working pixel (1 on a pyramid with the model's scale);
    `held_rows`: output rows of class ids held back until their objects are complete.
    """
    tile, (_, work_w), (_, out_w) = plan.tile, plan.work_shape, plan.out_shape
    source = (tile * max(level_ratio, 1.0)) ** 2  # one tile's pixels at the level it is read from
    per_reader = source * 3 if source <= READ_BLOCK_PIXELS else tile * tile * 24 + REDUCE_BLOCK_PIXELS * 3
    return {
        "tiles": (PREFETCH_BATCHES + 1) * batch_size * tile * tile * (3 + 3 + 4 * channels)  # read, resized, predicted
        + int(readers * per_reader),
        "width": (channels + 1) * tile * max(work_w, tile) * 4  # the stitching band: weighted sums and weights
        + channels * tile * work_w * 4 * 2  # a released band, and its copy held for resampling
        + 4 * channels * RowResampler.ROW_BLOCK * out_w * 4  # output blocks in flight
        + held_rows * out_w,  # rows waiting for their objects to end
    }


def check_memory(
    plan: Plan,
    channels: int,
    batch_size: int,
    readers: int | None = None,
    level_ratio: float = 1.0,
    held_rows: int = 0,
) -> None:
    """Refuse a run that would need more than `max_run_bytes()`, saying how much and what to change."""
    if batch_size < 1:
        raise SegmentError(f"the batch size must be at least 1, not {batch_size}")
    parts = memory_needed(plan, channels, batch_size, readers or default_readers(), level_ratio, held_rows)
    need, limit = sum(parts.values()), max_run_bytes()
    if need > limit:
        advice = (
            "segment a --region, or write at a coarser scale"
            if parts["width"] > parts["tiles"]
            else "use a smaller --tile, --batch or --readers"
        )
        raise SegmentError(
            f"this run would hold {need / 1024**3:.1f} GiB in memory (tiles of {plan.tile} px, batch {batch_size}, "
            f"{plan.work_shape[1]} px wide at the model's scale); the limit is {limit / 1024**3:.0f} GiB "
            f"(NAPARI_NEPHRO_MAX_RUN_GIB): {advice}"
        )


def max_run_bytes() -> int:
    """MAX_RUN_BYTES, or NAPARI_NEPHRO_MAX_RUN_GIB for a machine with more memory."""
    try:
        gib = float(os.environ.get("NAPARI_NEPHRO_MAX_RUN_GIB", ""))
    except ValueError:
        return MAX_RUN_BYTES
    return int(gib * 1024**3) if math.isfinite(gib) and gib > 0 else MAX_RUN_BYTES


def default_readers() -> int:
    """Threads that read tiles (and resample output rows): enough to keep a GPU fed, one per core up to 8."""
    return max(2, min(8, os.cpu_count() or 2))


def channels_of(segmenter) -> int:
    """Output channels: one (foreground) for one class, else background + the classes."""
    classes = list(segmenter.classes)
    return 1 if len(classes) == 1 else len(classes) + 1


def _read(slide: Slide, plan: Plan, tile: GridTile) -> np.ndarray:
    return read_scaled(slide, plan.level0_box(tile), (plan.tile, plan.tile))


def _timed_read(slide: Slide, plan: Plan, tile: GridTile, clock: StageClock) -> np.ndarray:
    t0 = time.perf_counter()
    try:
        return _read(slide, plan, tile)
    finally:
        clock.add(time.perf_counter() - t0)


def _predict(segmenter, pixels: np.ndarray) -> np.ndarray:
    """`predict`, halving the batch while the GPU runs out of memory (a smaller batch is slower, not wrong)."""
    try:
        return segmenter.predict(pixels)
    except Exception as exc:
        if not _out_of_memory(exc) or len(pixels) == 1:
            raise
    _empty_gpu_cache()
    warnings.warn(f"out of GPU memory on a batch of {len(pixels)}; retrying in halves", RuntimeWarning, stacklevel=2)
    half = len(pixels) // 2
    return np.concatenate([_predict(segmenter, pixels[:half]), _predict(segmenter, pixels[half:])])


def _out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _empty_gpu_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Counter:
    def __init__(self, total: int, done: int, callback: Callable[[Progress], None] | None) -> None:
        self.total, self.done, self.callback = total, done, callback
        self.start, self.start_done = time.perf_counter(), done

    def add(self, n: int) -> None:
        self.done += n
        if self.callback is None:
            return
        elapsed = time.perf_counter() - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        self.callback(Progress(self.done, self.total, rate, eta))


class _Stage(threading.Thread):
    """A worker thread fed through a short queue: `handle` each item, then `finish` whatever happened.

    A failure stops the thread; `put` then raises in the feeding thread and `close`
    re-raises the failure itself.
    """

    def __init__(self, name: str, depth: int) -> None:
        super().__init__(name=name, daemon=True)
        self.inbox: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None

    def handle(self, item) -> None:
        raise NotImplementedError

    def finish(self, failed: bool) -> None:
        """Called last, in the thread, also after a failure."""

    def put(self, item) -> None:
        while self.is_alive():  # started before anything is handed to it
            if self.error is not None:
                raise _Stop from self.error
            try:
                self.inbox.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        if self.error is not None:
            raise _Stop from self.error

    def close(self) -> None:
        """Let it finish what was handed over, wait for it, and re-raise its failure."""
        while self.is_alive():
            try:
                self.inbox.put(None, timeout=0.2)
                break
            except queue.Full:
                continue
        self.join()
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        try:
            while (item := self.inbox.get()) is not None:
                self.handle(item)
        except _Stop as stop:  # the next stage failed: its error is the one to report
            self.error = stop.__cause__
        except BaseException as exc:  # handed to the feeding thread by put / close
            self.error = exc
        finally:
            try:
                self.finish(self.error is not None)
            except BaseException as exc:
                self.error = self.error or exc


class _Writer(_Stage):
    """Stitches predicted tiles in grid order, off the model's thread; a sink thread writes what it releases."""

    def __init__(
        self, stitcher: RowStitcher, resampler: RowResampler, sink: Sink, tiles, row_starts, clocks: StageClocks
    ) -> None:
        super().__init__("nephro-stitch", PREFETCH_BATCHES)
        self.stitcher, self.resampler, self.sink = stitcher, resampler, sink
        self.tiles, self.row_starts = list(tiles), row_starts
        self._next = 0  # index in self.tiles of the next tile to stitch
        self._sink_thread = _SinkThread(sink, clocks.write)
        self.clocks, self.laps = clocks, Laps()  # stitch: this thread's work, not its waits for the sink thread

    def run(self) -> None:
        self._sink_thread.start()
        super().run()

    def handle(self, item) -> None:
        self.laps.restart()
        batch, probs = item
        for tile, p in zip(batch, probs, strict=True):
            self._advance(until=tile)
            self.stitcher.add(tile.y, tile.x, p)
            self._next += 1
        self.laps.to(self.clocks.stitch)

    def finish(self, failed: bool) -> None:
        self.laps.restart()
        try:
            if not failed:
                self._advance()  # trailing glass tiles, and the last rows when the run is complete
        finally:
            self.laps.to(self.clocks.stitch)
            self._sink_thread.close()

    def _advance(self, until: GridTile | None = None) -> None:
        """Pass over glass tiles up to `until` (at the end: up to the first tile never predicted),
        then release the rows above the next tile's row: no later tile touches them."""
        while self._next < len(self.tiles) and self.tiles[self._next] is not until:
            if self.tiles[self._next].tissue:
                if until is not None:
                    raise RuntimeError("tiles arrived out of grid order")
                break  # the run stopped early: this tile's rows stay unwritten
            self._next += 1
        more = self._next < len(self.tiles)
        finished = min(
            self.row_starts[self.tiles[self._next].row] if more else self.stitcher.height, self.stitcher.height
        )
        while finished > self.stitcher.top:  # a tile's height at a time: rows of glass below can be many
            start, rows = self.stitcher.release(min(finished, self.stitcher.top + self.stitcher.tile))
            for y, out in self.resampler.push(start, rows):
                prepared = self.sink.prepare(out)  # class ids are 4x smaller than floats
                self.laps.to(self.clocks.stitch)
                self._sink_thread.put((y, prepared))
                self.laps.to(None)  # waiting for the sink thread: its own clock has that time


class _SinkThread(_Stage):
    """Writes released rows to the sink in order, and flushes it at the end whatever happened."""

    def __init__(self, sink: Sink, clock: StageClock) -> None:
        super().__init__("nephro-sink", 2)
        self.sink, self.clock = sink, clock

    def handle(self, item) -> None:
        t0 = time.perf_counter()
        try:
            self.sink.write(*item)
        finally:
            self.clock.add(time.perf_counter() - t0)

    def finish(self, failed: bool) -> None:
        t0 = time.perf_counter()
        try:
            self.sink.flush()
        finally:
            self.clock.add(time.perf_counter() - t0)
