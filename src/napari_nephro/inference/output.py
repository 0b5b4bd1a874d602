"""Where stitched rows go: a numpy array for a region, or a partial zarr store for a slide.

A slide-sized run writes its label image row band by row band into
`<out>.partial.zarr`, recording after each band how far it got. That store is a
valid one-level OME-Zarr label image at every moment (open it to see the finished
part), and `resume` continues it. Only when every row is written is it turned into
the asked-for file (OME-Zarr pyramid, label TIFF or GeoJSON) under its real name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np

from .._atomic import atomic_output
from .errors import SegmentError
from .stitch import to_labels

RUN_KEY = "napari-nephro-run"
OUTPUT_SUFFIXES = (".zarr", ".tif", ".tiff", ".geojson")
CHUNK = 1024


class Sink(Protocol):
    rows_done: int  # output rows already final (a resumed run starts after them)

    def write(self, y: int, probs: np.ndarray) -> None:
        """Take output rows [y, y + n) as (C, n, width) probabilities."""
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

    def write(self, y: int, probs: np.ndarray) -> None:
        n = probs.shape[1]
        if self.probabilities:
            self.array[:, y : y + n] = probs
        else:
            self.array[y : y + n] = to_labels(probs, self.threshold)
        self.rows_done = y + n

    def flush(self) -> None:
        pass


def partial_path(out: Path) -> Path:
    """`mask.zarr` -> `mask.partial.zarr`; `mask.tif` -> `mask.tif.partial.zarr`."""
    name = out.name[: -len(".zarr")] if out.suffix == ".zarr" else out.name
    return out.with_name(f"{name}.partial.zarr")


def check_output(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse an output we cannot or must not write, before any tile is read."""
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise SegmentError(f"{out}: the output must end in .zarr (OME-Zarr labels), .tif or .geojson")
    if not out.parent.is_dir():
        raise SegmentError(f"{out}: folder {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise SegmentError(f"{out}: already exists; pass --overwrite to replace it")
    partial = partial_path(out)
    if resume and not partial.exists():
        raise SegmentError(f"{out}: nothing to resume (no {partial.name})")
    if partial.exists() and not resume and not overwrite:
        done = _describe_progress(partial)
        raise SegmentError(
            f"{out}: an unfinished run is in {partial.name} ({done}); pass --resume to finish it or --overwrite to restart"
        )


def _describe_progress(partial: Path) -> str:
    try:
        record = json.loads((partial / ".zattrs").read_text())[RUN_KEY]
        return f"{record['rows_done']} of {record['rows']} rows done"  # rows of the region, at output scale
    except (OSError, ValueError, KeyError, TypeError):
        return "progress unknown"


class ZarrRunStore:
    """A run's label image at level 0, written in whole chunk rows, with its progress recorded.

    The record (plan, model, threshold, rows done) is rewritten after each band, after
    the band's pixels, so a killed run's record never claims rows it did not write.
    """

    def __init__(self, path: Path, group, record: dict, threshold: float) -> None:
        self.path, self.group, self.record, self.threshold = path, group, record, threshold
        self.array = group["0"]
        self.offset = tuple(record["offset"])  # where the region's output rows start in the slide-sized image
        self.rows_done = int(record["rows_done"])
        self._buffer: list[np.ndarray] = []
        self._buffer_top = self.rows_done

    @classmethod
    def create(
        cls, path: Path, shape: tuple[int, int], offset: tuple[int, int], record: dict, ngff: dict, threshold: float
    ) -> ZarrRunStore:
        """A store holding the whole slide's extent (`shape`), of which the run fills its region at `offset`."""
        import zarr

        if path.exists():
            shutil.rmtree(path)
        group = zarr.open_group(store=str(path), mode="w", zarr_format=2)
        chunks = (min(CHUNK, shape[0]), min(CHUNK, shape[1]))
        array = group.create_array("0", shape=shape, chunks=chunks, dtype=np.uint8, fill_value=0)
        array.attrs["_ARRAY_DIMENSIONS"] = ["y", "x"]
        record = {**record, "offset": list(offset), "rows_done": 0, "complete": False}
        group.attrs.update({**ngff, RUN_KEY: record})
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
            raise SegmentError(
                f"{path}: was started with a different {', '.join(changed)}; "
                "resume with the same options, or pass --overwrite to restart"
            )
        return cls(path, group, record, threshold)

    def write(self, y: int, probs: np.ndarray) -> None:
        if y != self._buffer_top + sum(len(b) for b in self._buffer):
            raise ValueError(f"rows must arrive in order: got {y}")
        self._buffer.append(to_labels(probs, self.threshold))
        held = sum(len(b) for b in self._buffer)
        top = self.offset[0] + self._buffer_top
        whole = (top + held) // CHUNK * CHUNK - top  # rows up to a chunk boundary: no chunk written twice
        if whole > 0:
            self._write_rows(whole)

    def flush(self) -> None:
        held = sum(len(b) for b in self._buffer)
        if held:
            self._write_rows(held)

    def _write_rows(self, n: int) -> None:
        rows = np.concatenate(self._buffer, axis=0)
        top = self._buffer_top
        (oy, ox), (height, width) = self.offset, self.array.shape
        h, w = min(n, height - oy - top), min(rows.shape[1], width - ox)
        if h > 0 and w > 0:
            self.array[oy + top : oy + top + h, ox : ox + w] = rows[:h, :w]
        self._buffer = [rows[n:]] if n < len(rows) else []
        self._buffer_top = self.rows_done = top + n
        self.update(rows_done=self.rows_done)

    def update(self, **values) -> None:
        self.record.update(values)
        self.group.attrs[RUN_KEY] = self.record


def finish(store: ZarrRunStore, out: Path, *, mpp: float | None, classes: dict[int, str], overwrite: bool) -> Path:
    """Turn a complete run store into `out` (.zarr pyramid, .tif, .geojson) and remove the store."""
    store.update(complete=True)
    suffix = out.suffix.lower()
    if suffix == ".zarr":
        _add_pyramid(store, mpp, classes)
        with atomic_output(out) as tmp:
            store.path.rename(tmp)
        return out
    import dask.array as da

    from ..annotations import write_geojson
    from ..annotations.label_source import ArrayLabels
    from ..annotations.labeltiff import write_label_tiff

    level0 = da.from_zarr(store.array)
    if suffix in (".tif", ".tiff"):
        write_label_tiff(ArrayLabels(level0, classes), out, mpp=mpp, overwrite=overwrite)
    else:
        write_geojson(objects_from_labels(level0, classes, store.record), out, overwrite=overwrite)
    shutil.rmtree(store.path)
    return out


def objects_from_labels(labels, classes: dict[int, str], record: dict):
    """One polygon object per connected piece of each class, in level-0 pixels (QuPath's convention)."""
    import shapely

    from ..annotations import AnnotationSet
    from ..annotations.model import Annotation
    from ..annotations.raster import vectorize_tiled

    d = record["plan"]["out_downsample"]
    by_class = vectorize_tiled(labels, classes=classes, downsample=d, object_type="detection")
    objects = []
    for ann in by_class:
        for part in shapely.get_parts(ann.geometry):
            objects.append(Annotation(part, ann.label, "detection", {"area_px": float(part.area)}))
    return AnnotationSet(objects, classes=list(classes.values()))


def _add_pyramid(store: ZarrRunStore, mpp: float | None, classes: dict[int, str]) -> None:
    """Levels 1.. each from the one before (nearest: keeps class ids), and NGFF metadata for all."""
    from ..annotations.label_source import ArrayLabels, level_downsamples, level_shape, tiles
    from ..annotations.omezarr import _metadata

    shape = store.array.shape
    downsamples = level_downsamples(shape)
    previous = store.array
    for index, d in enumerate(downsamples[1:], start=1):
        level = level_shape(shape, d)
        array = store.group.create_array(
            str(index), shape=level, chunks=(min(CHUNK, level[0]), min(CHUNK, level[1])), dtype=np.uint8, overwrite=True
        )
        array.attrs["_ARRAY_DIMENSIONS"] = ["y", "x"]
        source = ArrayLabels(previous)
        for y, x, h, w in tiles(level, CHUNK):
            array[y : y + h, x : x + w] = source.tile(2, y, x, h, w)
        previous = array
    store.group.attrs.update(_metadata(store.record.get("name", "segmentation"), downsamples, mpp, classes))
