"""Where stitched rows go: a numpy array for a region, or a partial zarr store for a slide.

A slide-sized run writes its label image row band by row band into
`<out>.partial.zarr`, recording after each band how far it got. That store is a
valid one-level OME-Zarr label image at every moment (open it to see the finished
part), and `resume` continues it. Only when every row is written is it turned into
the asked-for file (OME-Zarr pyramid, label TIFF or GeoJSON) under its real name.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from ..annotations.omezarr import RUN_KEY  # where a run records its progress, read by the readers too
from ..common.atomic import atomic_output
from ..common.json_io import JSONFileError, read_json
from .errors import SegmentError
from .stitch import to_labels

OUTPUT_SUFFIXES = (".zarr", ".tif", ".tiff", ".geojson")
CHUNK = 1024  # chunk side; up to this many rows per level are buffered before a write


class Sink(Protocol):
    rows_done: int  # output rows already final (a resumed run starts after them)

    def prepare(self, probs: np.ndarray) -> np.ndarray:
        """What to keep of (C, n, width) probabilities (e.g. class ids), made before queueing for `write`."""
        ...

    def write(self, y: int, rows: np.ndarray) -> None:
        """Take output rows [y, y + n), as `prepare` made them."""
        ...

    def flush(self) -> None:
        """Make everything written so far durable (end of run, or cancel)."""
        ...


class ArraySink:
    """A region's result in memory: class ids (uint8) or the probabilities themselves."""

    def __init__(self, shape: tuple[int, int], channels: int, *, probabilities: bool = False, threshold: float = 0.5):
        self.threshold, self.probabilities = threshold, probabilities
        self.array = np.zeros((channels, *shape), np.float32) if probabilities else np.zeros(shape, np.uint8)
        self.rows_done = 0

    def prepare(self, probs: np.ndarray) -> np.ndarray:
        return probs if self.probabilities else to_labels(probs, self.threshold)

    def write(self, y: int, rows: np.ndarray) -> None:
        n = rows.shape[-2]
        self.array[..., y : y + n, :] = rows
        self.rows_done = y + n

    def flush(self) -> None:
        pass


def partial_path(out: Path) -> Path:
    """`mask.zarr` -> `mask.partial.zarr`; `mask.tif` -> `mask.tif.partial.zarr`."""
    name = out.name[: -len(".zarr")] if out.suffix == ".zarr" else out.name
    return out.with_name(f"{name}.partial.zarr")


def check_output(
    out: Path, *, overwrite: bool, resume: bool, locked: bool = False, allowed: tuple[str, ...] = OUTPUT_SUFFIXES
) -> bool:
    """Refuse an output we cannot or must not write, before any tile is read.

    Returns True when `resume` finds the run already complete: `out` is there and
    nothing unfinished is (a run killed just after it finished); there is nothing to do.
    `locked`: the caller holds the output's lock (else another holder is refused).
    """
    from ..common.lock import Locked, holder

    if out.suffix.lower() not in allowed:
        raise SegmentError(f"{out}: the output must end in {', '.join(allowed[:-1])} or {allowed[-1]}")
    if not out.parent.is_dir():
        raise SegmentError(f"{out}: folder {out.parent} does not exist")
    owner = None if locked else holder(out)
    if owner is not None:
        raise SegmentError(str(Locked(out, owner)))
    partial = partial_path(out)
    if resume and out.exists() and partial.exists() and _run_record(partial).get("complete") is True:
        shutil.rmtree(partial, ignore_errors=True)  # killed while removing the store after writing `out`
    if resume and not partial.exists():
        if out.exists():
            return True
        raise SegmentError(f"{out}: nothing to resume (no {partial.name})")
    if out.exists() and not overwrite:
        raise SegmentError(f"{out}: already exists; pass --overwrite to replace it")
    if partial.exists() and not resume and not overwrite:
        done = _describe_progress(partial)
        raise SegmentError(
            f"{out}: an unfinished run is in {partial.name} ({done}); pass --resume to finish it or --overwrite to restart"
        )
    return False


def _difference(key: str, was, now) -> str:
    """`batch (was 4, now 8)` for the simple values a user sets; the key alone for the rest."""
    simple = (int, float, str, type(None))
    return f"{key} (was {was}, now {now})" if isinstance(was, simple) and isinstance(now, simple) else key


def _run_record(partial: Path) -> dict:
    """The run record of a partial store, or {} when it has none that can be read."""
    try:
        record = read_json(partial / ".zattrs")[RUN_KEY]
    except (JSONFileError, KeyError, TypeError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe_progress(partial: Path) -> str:
    record = _run_record(partial)
    try:
        return f"{int(record['rows_done'])} of {int(record['rows'])} rows done"  # rows of the region, at output scale
    except (KeyError, TypeError, ValueError):
        return "progress unknown"


class _LevelWriter:
    """One pyramid level of a run store, fed level-0 bands, written in whole chunk rows.

    Level k takes every 2**k-th row and column of level 0 (nearest: class ids stay
    class ids), so every level is finished as the run goes and no pass over level 0
    is needed at the end. Rows wait in one preallocated chunk-row buffer.
    """

    def __init__(self, array, factor: int, first_row: int, x_offset: int) -> None:
        self.array, self.factor = array, factor
        self.top = first_row  # level row of the buffer's first row (absolute)
        self.col = -(-x_offset // factor)  # first level column the region reaches
        self.skip = self.col * factor - x_offset  # its column in a band
        self.held = 0
        self._buffer: np.ndarray | None = None

    @property
    def done(self) -> int:
        return self.top  # rows above the buffer are on disk

    def add(self, y0: int, band: np.ndarray) -> None:
        """Level-0 rows [y0, y0 + len(band)) of the region's columns (absolute row numbers)."""
        f = self.factor
        j0, j1 = -(-y0 // f), -(-(y0 + len(band)) // f)
        if j1 <= j0:
            return
        if j0 != self.top + self.held:
            raise ValueError(f"level rows must arrive in order: got {j0}")
        rows = band[j0 * f - y0 :: f, self.skip :: f][: j1 - j0]
        if self._buffer is None:
            self._buffer = np.zeros((CHUNK, rows.shape[1]), self.array.dtype)
        while len(rows):
            boundary = (self.top // CHUNK + 1) * CHUNK  # write at chunk boundaries: each chunk written once
            n = min(len(rows), boundary - self.top - self.held)
            self._buffer[self.held : self.held + n] = rows[:n]
            self.held, rows = self.held + n, rows[n:]
            if self.top + self.held == boundary:
                self._write()

    def flush(self) -> None:
        if self.held:
            self._write()

    def _write(self) -> None:
        height, width = self.array.shape
        h, w = min(self.held, height - self.top), min(self._buffer.shape[1], width - self.col)
        if h > 0 and w > 0:
            self.array[self.top : self.top + h, self.col : self.col + w] = self._buffer[:h, :w]
        self.top += self.held
        self.held = 0


def _centre_pixels(metadata: dict, record: dict) -> None:
    """Add each level's NGFF translation: a pixel of d level-0 pixels has its centre (d - 1) / 2 of them
    from the slide's first pixel centre, so a coarse output lies exactly over the slide in any NGFF viewer."""
    try:
        d, slide_mpp = float(record["plan"]["out_downsample"]), float(record["slide_mpp"])
    except (KeyError, TypeError, ValueError):
        return  # not a run's record: scales only, as before
    for dataset, factor in zip(metadata["multiscales"][0]["datasets"], record["levels"], strict=True):
        shift = (d * factor - 1) / 2 * slide_mpp
        if shift:
            dataset["coordinateTransformations"].append({"type": "translation", "translation": [shift, shift]})


# what a label TIFF keeps of its run; "complete" (True: written only by `finish`) so readers do not take it for a partial run
RUN_FIELDS = ("slide", "slide_shape", "slide_mpp", "model", "plan", "complete")


def _writable(array):
    """`array` writing every chunk it is given: zarr's test of each chunk against the fill value took 3x the
    time of compressing and writing it (zarr 3.1), and an empty chunk of class ids compresses to a few bytes."""
    with_config = getattr(array, "with_config", None)
    return with_config({"write_empty_chunks": True}) if with_config is not None else array


class ZarrRunStore:
    """A run's label pyramid, written in whole chunk rows as bands arrive, with its progress recorded.

    The record (plan, model, threshold, rows done per level) is rewritten after
    each write, after the pixels, so a killed run's record never claims rows it
    did not write. `rows_done` counts the region's rows on disk at level 0; coarser
    levels, which buffer more rows per chunk, are caught up from level 0 on resume.
    """

    def __init__(self, path: Path, group, record: dict, threshold: float) -> None:
        self.path, self.group, self.record, self.threshold = path, group, record, threshold
        self.extra_record: Callable[[int], dict] | None = None  # more to record with each step of rows_done
        self.array = group["0"]
        self.offset = tuple(record["offset"])  # where the region's output rows start in the slide-sized image
        self.rows_done = int(record["rows_done"])
        start = self.offset[0] + self.rows_done  # absolute level-0 row to continue from
        factors = record["levels"]
        self.levels = [
            _LevelWriter(_writable(group[str(k)]), f, -(-start // f), self.offset[1]) for k, f in enumerate(factors)
        ]
        self._catch_up(record.get("levels_done", [-(-start // f) for f in factors]), start)

    @classmethod
    def create(
        cls,
        path: Path,
        shape: tuple[int, int],
        offset: tuple[int, int],
        record: dict,
        threshold: float,
        *,
        mpp: float | None,
        dtype=np.uint8,
    ) -> ZarrRunStore:
        """A store holding the whole slide's extent (`shape`, `mpp` um per pixel), of which the run fills
        its region at `offset`; NGFF metadata for every level from the start, so it opens at any moment.
        `dtype`: uint8 class ids for a semantic run, uint32 object ids for an instance run."""
        import zarr
        from numcodecs import Blosc

        from ..annotations.label_source import level_downsamples, level_shape
        from ..annotations.omezarr import ngff_metadata

        if path.exists():
            shutil.rmtree(path)
        group = zarr.open_group(store=str(path), mode="w", zarr_format=2)
        factors = level_downsamples(shape)
        for k, f in enumerate(factors):
            level = level_shape(shape, f)
            array = group.create_array(
                str(k),
                shape=level,
                chunks=(min(CHUNK, level[0]), min(CHUNK, level[1])),
                dtype=dtype,
                fill_value=0,
                compressors=Blosc(cname="zstd", clevel=1, shuffle=Blosc.NOSHUFFLE),
            )
            array.attrs["_ARRAY_DIMENSIONS"] = ["y", "x"]
        record = {**record, "offset": list(offset), "levels": factors, "rows_done": 0, "complete": False}
        classes = {int(k): v for k, v in record["classes"].items()}
        metadata = ngff_metadata(record["name"], factors, mpp, classes)
        _centre_pixels(metadata, record)
        group.attrs.update({**metadata, RUN_KEY: record})
        return cls(path, group, record, threshold)

    @classmethod
    def reopen(cls, path: Path, expected: dict, threshold: float) -> ZarrRunStore:
        """The partial store of an earlier run with the same slide, model, plan and threshold."""
        import zarr

        try:
            group = zarr.open_group(store=str(path), mode="r+")
            record = dict(group.attrs[RUN_KEY])
        except Exception:  # zarr raises several types for a folder that is not its store
            raise SegmentError(f"{path}: not a partial run of napari-nephro; remove it or pass --overwrite") from None
        changed = [key for key, value in expected.items() if record.get(key) != value]
        if changed:
            what = ", ".join(_difference(key, record.get(key), expected[key]) for key in changed)
            raise SegmentError(
                f"{path}: was started with a different {what}; resume with the same options, or pass --overwrite to restart"
            )
        return cls(path, group, record, threshold)

    def _catch_up(self, levels_done: list[int], start: int) -> None:
        """After a kill, coarse levels may lag level 0: rebuild their missing rows from level 0 on disk."""
        for writer, done in zip(self.levels[1:], levels_done[1:], strict=True):
            f = writer.factor
            if done * f >= start:
                continue
            y0 = done * f
            x0 = self.offset[1]
            band = np.asarray(self.array[y0:start, x0 : x0 + int(self.record["cols"])])
            writer.top = done
            writer.add(y0, band)
            writer.flush()

    def prepare(self, probs: np.ndarray) -> np.ndarray:
        return to_labels(probs, self.threshold)

    def write(self, y: int, labels: np.ndarray) -> None:
        y0 = self.offset[0] + y
        for writer in self.levels:
            writer.add(y0, labels)
        self._record()

    def flush(self) -> None:
        for writer in self.levels:
            writer.flush()
        self._record()

    def _record(self) -> None:
        done = [w.done for w in self.levels]
        rows = max(0, min(done[0] - self.offset[0], int(self.record["rows"])))  # coarse levels catch up on resume
        if done != self.record.get("levels_done") or rows != self.rows_done:
            self.rows_done = rows
            extra = self.extra_record(rows) if self.extra_record is not None else {}
            self.update(rows_done=rows, levels_done=done, **extra)  # one write: the record never mixes two steps

    def update(self, **values) -> None:
        self.record.update(values)
        self.group.attrs[RUN_KEY] = self.record


def finish(store: ZarrRunStore, out: Path, *, mpp: float | None, classes: dict[int, str], overwrite: bool) -> Path:
    """Turn a complete run store into `out` (.zarr pyramid, .tif, .geojson) and remove the store."""
    store.update(complete=True)
    suffix = out.suffix.lower()
    if suffix == ".zarr":
        with atomic_output(out) as tmp:
            store.path.rename(tmp)
        return out
    import dask.array as da

    from ..annotations import write_geojson
    from ..annotations.label_source import ArrayLabels
    from ..annotations.labeltiff import write_label_tiff

    level0 = da.from_zarr(store.array)
    if suffix in (".tif", ".tiff"):
        run = {k: store.record[k] for k in RUN_FIELDS if k in store.record}  # its scale on the slide
        write_label_tiff(ArrayLabels(level0, classes), out, mpp=mpp, overwrite=overwrite, run=run)
    else:
        objects = class_objects(level0, classes, store.record["plan"]["out_downsample"])
        write_geojson(objects, out, overwrite=overwrite)
    shutil.rmtree(store.path)
    return out


def class_objects(labels, classes: dict[int, str], downsample: float = 1.0):
    """A class-id label image (numpy, dask or zarr) as one detection per connected piece of each class.

    `downsample`: slide level-0 pixels per label pixel, so the outlines (and `area_px`) are in level-0
    pixels whatever scale the labels were written at."""
    import shapely

    from ..annotations import AnnotationSet
    from ..annotations.model import Annotation
    from ..annotations.raster import vectorize_tiled

    by_class = vectorize_tiled(labels, classes=classes, downsample=downsample, object_type="detection")
    objects = []
    for ann in by_class:
        for part in shapely.get_parts(ann.geometry):
            objects.append(Annotation(part, ann.label, "detection", {"area_px": float(part.area)}))
    return AnnotationSet(objects, classes=list(classes.values()))
