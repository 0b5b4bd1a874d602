"""Where an instance run's objects go: memory for a region, a resumable store for a slide, then the file asked for.

A slide run writes object ids (uint32) into the same partial OME-Zarr store as a
semantic run, and beside the pixels, inside that folder, one table row per
object (`nuclei.csv`) and, when polygons are wanted, one QuPath detection per line
(`nuclei.geojsonl`). Each tile row records where it starts in both files and
which id it starts with; a resumed run cuts the files back to the row it restarts
at. At the end the store becomes the output: an OME-Zarr label pyramid (the table
kept inside it), a CSV or Parquet table, or a GeoJSON FeatureCollection.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
from shapely.geometry import mapping

from ..annotations.colors import class_color
from ..common.atomic import atomic_output
from .errors import SegmentError
from .instance_engine import Nucleus
from .output import ZarrRunStore

TABLE = "nuclei.csv"
DETECTIONS = "nuclei.geojsonl"
STATE_KEY = "instances"  # in the run record: per tile row, its first id and where it starts in the files
COLUMNS = ["id", "class", "score", "x_um", "y_um", "area_um2", "x_px", "y_px"]
INSTANCE_SUFFIXES = (".zarr", ".geojson", ".csv", ".parquet")


def class_name(classes: list[str], cls: int) -> str:
    """The name of class index `cls`; its number when the model gave one beyond its list."""
    return classes[cls] if 0 <= cls < len(classes) else str(cls)


def table_row(n: Nucleus, classes: list[str], mpp: float) -> list:
    return [
        n.id,
        class_name(classes, n.cls),
        round(n.score, 4),
        round(n.x * mpp, 3),
        round(n.y * mpp, 3),
        round(n.area_um2, 2),
        round(n.x, 2),
        round(n.y, 2),
    ]


def detection(n: Nucleus, classes: list[str], run: str) -> dict:
    """One QuPath detection: objectType, class with its colour, measurements; a stable id per run and object."""
    name = class_name(classes, n.cls)
    return {
        "type": "Feature",
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"napari-nephro/{run}/{n.id}")),
        "geometry": mapping(n.polygon),
        "properties": {
            "objectType": "detection",
            "classification": {"name": name, "color": list(class_color(name))},
            "measurements": {"Object id": n.id, "Area µm^2": round(n.area_um2, 2), "Score": round(n.score, 4)},
        },
    }


class RegionInstances:
    """A region's objects in memory: an id image at the output grid and the objects themselves."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.array = np.zeros(shape, np.uint32)
        self.nuclei: list[Nucleus] = []
        self.rows_done = 0

    def start(self, row: int) -> tuple[int, int]:
        return 0, 1

    def finished_ids(self, rows, cols, below: int):
        return None  # a region is never resumed

    def begin_row(self, row: int, next_id: int) -> None:
        pass

    def add(self, nuclei: list[Nucleus]) -> None:
        self.nuclei.extend(nuclei)

    def write(self, y: int, rows: np.ndarray) -> None:
        self.array[y : y + len(rows)] = rows
        self.rows_done = y + len(rows)

    def flush(self) -> None:
        pass


class SlideInstances:
    """A slide run's objects on disk, in the partial store's folder, resumable at any tile row."""

    def __init__(self, store: ZarrRunStore, classes: list[str], slide_mpp: float, polygons: bool, run: str) -> None:
        self.store, self.classes, self.mpp, self.polygons, self.run = store, classes, slide_mpp, polygons, run
        self.rows: dict[str, list[int]] = dict(store.record.get(STATE_KEY, {}).get("rows", {}))
        self._table = self._detections = None
        store.extra_record = lambda done: {STATE_KEY: {"rows": self.rows}}

    @property
    def rows_done(self) -> int:
        return self.store.rows_done

    def start(self, row: int) -> tuple[int, int]:
        table, detections = self.store.path / TABLE, self.store.path / DETECTIONS
        recorded = [int(k) for k in self.rows if int(k) <= row]
        if not recorded:
            if self.rows:
                raise SegmentError(
                    f"{self.store.path}: its record does not say where the run can restart; pass --overwrite"
                )
            self._table = open(table, "wb")  # noqa: SIM115 - kept open for the run, closed in flush
            self._table.write((",".join(COLUMNS) + "\n").encode())
            self._detections = open(detections, "wb") if self.polygons else None  # noqa: SIM115
            return 0, 1
        row = max(recorded)  # the latest row recorded at or before the one asked for: earlier is always safe
        first_id, table_at, detections_at = self.rows[str(row)]
        self._table = _cut(table, table_at)
        self._detections = _cut(detections, detections_at) if self.polygons else None
        self.rows = {k: v for k, v in self.rows.items() if int(k) <= row}
        return row, int(first_id)

    def finished_ids(self, rows: tuple[int, int], cols: tuple[int, int], below: int) -> np.ndarray:
        oy, ox = self.store.offset
        ids = np.asarray(self.store.array[oy + rows[0] : oy + rows[1], ox + cols[0] : ox + cols[1]])
        return np.where(ids < below, ids, 0).astype(np.uint32)

    def begin_row(self, row: int, next_id: int) -> None:
        self._table.flush()
        at_detections = 0
        if self._detections is not None:
            self._detections.flush()
            at_detections = self._detections.tell()
        self.rows[str(row)] = [int(next_id), self._table.tell(), at_detections]

    def add(self, nuclei: list[Nucleus]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerows(table_row(n, self.classes, self.mpp) for n in nuclei)
        self._table.write(buffer.getvalue().encode())
        if self._detections is not None:
            lines = "".join(json.dumps(detection(n, self.classes, self.run)) + "\n" for n in nuclei)
            self._detections.write(lines.encode())

    def write(self, y: int, rows: np.ndarray) -> None:
        self._flush_files()  # the table reaches at least as far as the pixels the record claims
        self.store.write(y, rows)

    def flush(self) -> None:
        self._flush_files()
        self.store.flush()

    def close(self) -> None:
        for f in (self._table, self._detections):
            if f is not None and not f.closed:
                f.close()

    def _flush_files(self) -> None:
        for f in (self._table, self._detections):
            if f is not None and not f.closed:
                f.flush()


def _cut(path: Path, at: int):
    """Open `path` for appending after cutting it back to `at` bytes (what the restarted rows wrote goes)."""
    if not path.exists() or path.stat().st_size < at:
        raise SegmentError(f"{path}: shorter than its run record says; pass --overwrite to restart")
    f = open(path, "r+b")  # noqa: SIM115 - kept open for the run
    f.truncate(at)
    f.seek(at)
    return f


def finish_instances(store: ZarrRunStore, out: Path) -> Path:
    """Turn a complete instance store into `out` (.zarr with its table inside, .csv, .parquet, .geojson)."""
    store.update(complete=True)
    table, detections = store.path / TABLE, store.path / DETECTIONS
    suffix = out.suffix.lower()
    if suffix == ".zarr":
        detections.unlink(missing_ok=True)
        with atomic_output(out) as tmp:
            store.path.rename(tmp)
        return out
    with atomic_output(out) as tmp:
        if suffix == ".csv":
            shutil.copyfile(table, tmp)
        elif suffix == ".parquet":
            write_parquet(table, tmp)
        else:
            _collect_features(detections, tmp)
    shutil.rmtree(store.path)
    return out


def write_parquet(table: Path, out: Path) -> None:
    try:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError:
        raise SegmentError("Parquet needs pyarrow: pip install pyarrow, or write a .csv table") from None
    pq.write_table(pacsv.read_csv(table), out)


def _collect_features(lines: Path, out: Path) -> None:
    """One FeatureCollection from one Feature per line, streamed: a slide's million nuclei never sit in memory."""
    with open(out, "wb") as dst:
        dst.write(b'{"type": "FeatureCollection", "features": [')
        first = True
        with open(lines, "rb") as src:
            for line in src:
                line = line.strip()
                if line:
                    dst.write(line if first else b"," + line)
                    first = False
        dst.write(b"]}")


def write_region_outputs(
    nuclei: list[Nucleus], out: Path, classes: list[str], mpp: float, run: str, *, overwrite: bool = False
) -> Path:
    """A region's objects as a .csv / .parquet table or .geojson detections (polygons needed for GeoJSON)."""
    if out.exists() and not overwrite:
        raise SegmentError(f"{out}: already exists; pass --overwrite to replace it")
    suffix = out.suffix.lower()
    with atomic_output(out) as tmp:
        if suffix in (".csv", ".parquet"):
            csv_path = tmp if suffix == ".csv" else tmp.with_name(tmp.name + ".csv")
            with open(csv_path, "w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(COLUMNS)
                writer.writerows(table_row(n, classes, mpp) for n in nuclei)
            if suffix == ".parquet":
                try:
                    write_parquet(csv_path, tmp)
                finally:
                    csv_path.unlink(missing_ok=True)
        elif suffix == ".geojson":
            features = [detection(n, classes, run) for n in nuclei if n.polygon is not None]
            tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        else:
            raise SegmentError(f"{out}: a table must end in .csv or .parquet, detections in .geojson")
    return out
