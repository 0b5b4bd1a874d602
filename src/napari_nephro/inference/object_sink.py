"""Whole objects in a whole-slide run: rows are held back until the objects in them are complete.

The engine writes class ids band by band. `ObjectSink` labels each band, joins
its objects to those of the band above, and holds the rows of every object that
may still grow (it touches the last row that arrived, or needs rows of context
below it). An object is cleaned (`clean_object`) once complete, and rows go on
to the real sink, in order, once no unfinished object reaches into them. Memory
holds the tallest unfinished object's rows, not the slide.

Resume: the durable progress of the real sink (`rows_done`) may fall inside an
object. With each step of it the sink records where a resumed run must restart
(above every object that reaches below that progress, with context) and the
summary of the objects wholly above it; a resumed run recomputes from there,
cleans the same objects identically, and forwards only rows not yet written.

Without rules nothing is held: rows pass at once and objects (4-connected, as
exports count them) are only counted as they end. The count is exact, except
that an object across the point a run was resumed from is measured from its part
below it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .objects import EIGHT, ObjectRules, clean_object
from .summary import ObjectSummary, reference_for

STATE_KEY = "object_state"  # in a partial run's record
CAP_ROWS = 2048  # an object still growing after this many rows is cut at the next multiple of it


@dataclass
class _Object:
    cls: int
    top: int
    bottom: int  # last row, inclusive
    x0: int
    x1: int  # last column, inclusive
    seed: tuple[int, int]  # one of its pixels (absolute row, column)
    area: int = 0  # pixels (counted without rules only)
    cut: bool = False  # cut at the cap: grows no more


class _Rows:
    """Rows [top, top + n) of a 2-D uint8 image, appended at the bottom and dropped at the top, amortised O(1)."""

    def __init__(self, width: int, top: int) -> None:
        self.buf = np.zeros((256, width), np.uint8)
        self.start, self.n, self.top = 0, 0, top

    @property
    def end(self) -> int:
        return self.top + self.n

    def append(self, rows: np.ndarray) -> None:
        need = self.n + len(rows)
        if self.start + need > len(self.buf):
            if need > len(self.buf) // 2:  # grow; else only move the live rows to the front
                bigger = np.zeros((max(2 * len(self.buf), 2 * need), self.buf.shape[1]), np.uint8)
                bigger[: self.n] = self.buf[self.start : self.start + self.n]
                self.buf = bigger
            else:
                self.buf[: self.n] = self.buf[self.start : self.start + self.n].copy()
            self.start = 0
        self.buf[self.start + self.n : self.start + need] = rows
        self.n = need

    def drop_until(self, row: int) -> None:
        k = min(max(0, row - self.top), self.n)
        self.start, self.n, self.top = self.start + k, self.n - k, self.top + k

    def view(self, a: int, b: int) -> np.ndarray:
        return self.buf[self.start + a - self.top : self.start + b - self.top]


class ArrayCollector:
    """A sink that only keeps what arrives: `clean_labels` streams an array through `ObjectSink` into it."""

    def __init__(self, shape: tuple[int, int], array: np.ndarray | None = None) -> None:
        self.array = np.zeros(shape, np.uint8) if array is None else array
        self.rows_done = 0

    def prepare(self, probs: np.ndarray) -> np.ndarray:
        return probs

    def write(self, y: int, rows: np.ndarray) -> None:
        self.array[y : y + len(rows)] = rows
        self.rows_done = y + len(rows)

    def flush(self) -> None:
        pass


class ObjectSink:
    """Cleans objects (`rules`; None: only counts them) between the engine and `inner`, in bounded memory.

    `rows`: the image's height, so the last row is known; `mpp`: um per output pixel.
    `state`: what an interrupted run recorded (`STATE_KEY`), to resume it exactly.
    An object taller than CAP_ROWS is cut at multiples of it, where it is cleaned
    and counted as several (and a resume may then restart it differently).
    """

    def __init__(
        self,
        inner,
        rules: ObjectRules | None,
        mpp: float,
        rows: int,
        *,
        classes: dict[int, str] | None = None,
        state: dict | None = None,
    ) -> None:
        self.inner, self.rules, self.mpp, self.rows = inner, rules, mpp, rows
        self.classes = classes or {}
        self.count_only = rules is None
        self.margin = 0 if self.count_only else rules.margin_px(mpp)
        reference = reference_for(self.classes, rules)
        self._small_px = reference.min_area_um2 / mpp**2 if reference is not None else 0.0
        self._summary = ObjectSummary(self.classes, mpp, small_dropped=rules is not None, reference=reference)
        self._skip_below = int(inner.rows_done)  # rows already written by an earlier run
        self._start = self._skip_below
        if state is not None and state.get("rows_done") == self._skip_below:
            self._start = int(state["restart"])
            self._summary.load_state(state["summary"])
        # objects ending above this row were counted by the earlier run: wholly above its written rows
        # (they were cleaned whole), or without rules above the row it restarts at (it sees the rest again)
        self._counted_from = self._start if self.count_only else self._skip_below
        self._arrived = self._start
        self._forwarded = self._start
        self._raw: _Rows | None = None  # class ids as they came, from `margin` rows above the held ones
        self._out: _Rows | None = None  # cleaned rows not yet forwarded
        self._objects: dict[int, _Object] = {}  # id -> object not yet cleaned
        self._open: set[int] = set()  # ids with a pixel in the last row that arrived
        self._closed: set[int] = set()  # ids that can grow no more, waiting for their rows of context below
        self._last: np.ndarray | None = None  # object id of each pixel of the last row
        self._last_cls: np.ndarray | None = None  # and its class
        self._next_id = 1
        self._failed = False
        self._done: list[tuple[int, int, int, list[int], int]] = []  # (top, bottom, class, areas, small): cleaned

    @property
    def rows_done(self) -> int:
        """Where the engine starts: at an earlier run's restart point, above the objects it had not finished."""
        return self._start if self._arrived == self._start else self.restart_for(self.inner.rows_done)

    def prepare(self, probs: np.ndarray) -> np.ndarray:
        return self.inner.prepare(probs)

    def write(self, y: int, rows: np.ndarray) -> None:
        if y != self._arrived:
            raise ValueError(f"rows must arrive in order: expected row {self._arrived}, got {y}")
        rows = np.asarray(rows, np.uint8)
        try:
            if self.count_only:
                self._add(rows)
                self._clean_ready()  # before the rows go on: what the inner sink records then counts them
                if y + len(rows) > self._skip_below:
                    start = max(y, self._skip_below)
                    self.inner.write(start, rows[start - y :])
                    self._commit(self.inner.rows_done)
                return
            while len(rows):
                boundary = (self._arrived // CAP_ROWS + 1) * CAP_ROWS  # bands end at the cap's multiples
                n = min(len(rows), boundary - self._arrived)
                self._add(rows[:n])
                rows = rows[n:]
            self._clean_ready()
            self._forward()
        except BaseException:
            self._failed = True  # half-cleaned: nothing more may go on, what went on stays
            raise

    def flush(self) -> None:
        if self._arrived >= self.rows and self._last is not None and not self._failed:
            self._clean_ready()  # the image has ended: every object is complete
            if not self.count_only:
                self._forward()
        self.inner.flush()

    def summary(self) -> ObjectSummary:
        """Every object counted so far (all of them after the last row), an earlier run's included."""
        total = ObjectSummary(self.classes, self.mpp, small_dropped=self._summary.small_dropped)
        total.reference = self._summary.reference
        total.merge(self._summary)
        for _, bottom, cls, areas, small in self._done:
            if bottom >= self._counted_from:
                total.add(cls, areas, small)
        return total

    def restart_for(self, rows_done: int) -> int:
        """The row a resumed run must start at when `rows_done` rows are written: above every object reaching
        below them, by the context its cleaning reads (and a row, so no object above is mistaken for one)."""
        if self.count_only:
            return max(0, rows_done - 1)  # the last row written: which objects in it go on is seen again
        tops = [top for top, bottom, *_ in self._done if bottom >= rows_done and top < rows_done]
        tops += [o.top for o in self._objects.values() if o.top < rows_done]
        return max(0, min([rows_done, *tops]) - self.margin - 1)

    def state(self, rows_done: int) -> dict:
        """What a resumed run needs when the inner sink has made `rows_done` rows durable."""
        self._commit(rows_done)
        return {"rows_done": rows_done, "restart": self.restart_for(rows_done), "summary": self._summary.to_state()}

    def _commit(self, rows_done: int) -> None:
        """Fold the objects a run resumed after `rows_done` rows will not see again into the summary kept with it."""
        below = self.restart_for(rows_done) if self.count_only else rows_done
        keep = []
        for entry in self._done:
            _, bottom, cls, areas, small = entry
            if bottom >= below:
                keep.append(entry)
            elif bottom >= self._counted_from:
                self._summary.add(cls, areas, small)
        self._done = keep

    # -- labelling ------------------------------------------------------------------------
    def _add(self, band: np.ndarray) -> None:
        y, width = self._arrived, band.shape[1]
        if not self.count_only:
            if self._raw is None:
                self._raw, self._out = _Rows(width, y), _Rows(width, y)
            self._raw.append(band)
            self._out.append(np.zeros_like(band))
        previous = self._last_cls
        first = np.zeros(width, np.int64)
        last = np.zeros(width, np.int64)
        created = []
        counts = np.bincount(band.ravel(), minlength=256)
        for cls in np.flatnonzero(counts[1:]) + 1:
            labels, n = ndimage.label(band == cls, None if self.count_only else EIGHT)
            base = self._next_id - 1
            self._next_id += n
            sizes = np.bincount(labels.ravel(), minlength=n + 1) if self.count_only else np.zeros(n + 1, int)
            for k, sl in enumerate(ndimage.find_objects(labels), start=1):
                row = labels[sl[0].start, sl[1]]
                seed = (y + sl[0].start, sl[1].start + int(np.argmax(row == k)))
                top, bottom = y + sl[0].start, y + sl[0].stop - 1
                obj = _Object(int(cls), top, bottom, sl[1].start, sl[1].stop - 1, seed, int(sizes[k]))
                self._objects[base + k] = obj
                created.append(base + k)
            first = np.where(labels[0] > 0, labels[0] + base, first)
            last = np.where(labels[-1] > 0, labels[-1] + base, last)
        if y % CAP_ROWS == 0 and not self.count_only:
            for i in list(self._open):  # grown for more than the cap: cut here
                if self._objects[i].top < y - CAP_ROWS:
                    self._objects[i].cut = True
                    self._open.discard(i)
                    self._closed.add(i)
        parent: dict[int, int] = {}
        if previous is not None:
            self._join(self._last, previous, first, band[0], parent)
        roots = {self._find(parent, i) for i in created}
        if previous is not None:
            roots |= {self._find(parent, i) for i in self._open}
        ids, inverse = np.unique(last, return_inverse=True)
        self._last = np.array([self._find(parent, int(i)) if i else 0 for i in ids], np.int64)[inverse]
        self._open = {int(i) for i in np.unique(self._last) if i}
        self._last_cls = band[-1].copy()
        self._arrived = y + len(band)
        self._closed |= roots - self._open

    def _join(self, above: np.ndarray, above_cls: np.ndarray, below: np.ndarray, below_cls, parent) -> None:
        """Merge the objects of the new band's first row with those of the row above they touch."""
        cut = [i for i, o in self._objects.items() if o.cut]
        w = len(above)
        pairs = []
        for dx in (0,) if self.count_only else (-1, 0, 1):  # 4- or 8-connected
            a = above[max(dx, 0) : w + min(dx, 0)]
            b = below[max(-dx, 0) : w - max(dx, 0)]
            same = (a > 0) & (b > 0)
            same &= above_cls[max(dx, 0) : w + min(dx, 0)] == below_cls[max(-dx, 0) : w - max(dx, 0)]
            if cut:
                same &= ~np.isin(a, cut)
            pairs.append(np.stack([a[same], b[same]]))
        for i, j in np.unique(np.concatenate(pairs, axis=1), axis=1).T.tolist():
            self._union(parent, i, j)

    def _find(self, parent: dict[int, int], i: int) -> int:
        while parent.get(i, i) != i:
            i = parent[i]
        return i

    def _union(self, parent: dict[int, int], i: int, j: int) -> None:
        a, b = self._find(parent, i), self._find(parent, j)
        if a == b:
            return
        a, b = min(a, b), max(a, b)
        parent[b] = a
        kept, gone = self._objects[a], self._objects.pop(b)
        kept.top, kept.bottom = min(kept.top, gone.top), max(kept.bottom, gone.bottom)
        kept.x0, kept.x1 = min(kept.x0, gone.x0), max(kept.x1, gone.x1)
        kept.seed = min(kept.seed, gone.seed)
        kept.area += gone.area
        self._open.discard(b)

    # -- cleaning and forwarding ------------------------------------------------------------
    def _clean_ready(self) -> None:
        ended = self._arrived >= self.rows
        if ended:
            self._closed |= self._open
            self._open = set()
        ready = sorted(i for i in self._closed if ended or self._objects[i].bottom + self.margin < self._arrived)
        for i in ready:
            self._closed.discard(i)
            self._clean(self._objects.pop(i))

    def _clean(self, obj: _Object) -> None:
        if self.count_only:
            self._done.append((obj.top, obj.bottom, obj.cls, [obj.area], int(obj.area < self._small_px)))
            return
        m, width = self.margin, self._raw.buf.shape[1]
        r0, r1 = max(obj.top - m, self._raw.top), min(obj.bottom + m + 1, self._arrived)
        c0, c1 = max(obj.x0 - m, 0), min(obj.x1 + m + 1, width)
        crop = self._raw.view(r0, r1)[:, c0:c1]
        box = (obj.top - r0, obj.bottom + 1 - r0, obj.x0 - c0, obj.x1 + 1 - c0)
        seed = (obj.seed[0] - r0, obj.seed[1] - c0)
        cleaned = clean_object(crop, obj.cls, box, seed, self.rules, self.mpp, self._small_px)
        a = max(r0, self._out.top)  # rows above were forwarded; the object itself lies below them
        self._out.view(a, r1)[:, c0:c1][cleaned.mask[a - r0 :]] = obj.cls
        self._done.append((obj.top, obj.bottom, obj.cls, cleaned.areas, cleaned.small))

    def _forward(self) -> None:
        """Hand on the rows no unfinished object reaches into; keep `margin` rows of context above the rest."""
        held = min([self._arrived, *(o.top for o in self._objects.values())])
        if held > self._forwarded:
            y = max(self._forwarded, self._skip_below)
            if held > y:
                self.inner.write(y, self._out.view(y, held))
                self._commit(self.inner.rows_done)
            self._forwarded = held
            self._out.drop_until(held)
        self._raw.drop_until(held - self.margin)
