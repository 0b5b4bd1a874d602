"""Run an instance model (nuclei) over a region into memory, or over a slide into a file, resumably."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..common.lock import Locked, exclusive
from ..common.text import duration
from ..io import Slide
from .api import MAX_REGION_BYTES, _device_name, _json, _level_ratio, plan_run
from .engine import Progress, RunStats, check_memory
from .errors import SegmentError
from .instance_engine import Nucleus, run_instance_tiles
from .instance_output import (
    INSTANCE_SUFFIXES,
    TABLE,
    RegionInstances,
    SlideInstances,
    class_name,
    finish_instances,
)
from .output import ZarrRunStore, check_output, partial_path
from .plan import WORKING, Plan, cells, output_mpp, slide_mpp


@dataclass
class NucleiSummary:
    """What an instance run found: objects per class, their sizes, and their density in the tissue."""

    classes: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    median_area_um2: float | None = None
    tissue_mm2: float | None = None  # estimated from the run's tissue map; None when glass was not looked for

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def density_per_mm2(self) -> float | None:
        return self.total / self.tissue_mm2 if self.tissue_mm2 else None

    def line(self) -> str:
        """'1,234 nuclei, 2,310 per mm² of tissue (0.53 mm²), median 28 µm²; inflammatory 200, ...'."""
        noun = "nucleus" if self.total == 1 else "nuclei"
        parts = [f"{self.total:,} {noun}"]
        if self.density_per_mm2 is not None:
            parts.append(f"{self.density_per_mm2:,.0f} per mm² of tissue ({self.tissue_mm2:.2f} mm²)")
        if self.median_area_um2 is not None:
            parts.append(f"median {self.median_area_um2:.0f} µm²")
        text = ", ".join(parts)
        if len(self.classes) > 1 and self.total:
            text += "; " + ", ".join(f"{c} {self.counts.get(c, 0):,}" for c in self.classes)
        return text

    describe = line  # what the widgets and the CLI print after a run, as for glomeruli

    def warning(self) -> str | None:
        """Nuclei have no plausibility rules yet: nothing to warn about."""
        return None


@dataclass
class InstanceRegionResult:
    """Object ids (H, W) uint32 over `region` at `out_downsample`, and one `Nucleus` per id."""

    array: np.ndarray
    nuclei: list[Nucleus]
    region: tuple[int, int, int, int]
    out_downsample: float
    mpp: float  # um per array pixel
    classes: list[str]
    stats: RunStats
    summary: NucleiSummary | None = None  # None for a cancelled run


@dataclass
class InstanceSlideResult:
    path: Path | None  # the finished output; None when the run was cancelled
    partial: Path
    rows_done: int
    rows: int
    stats: RunStats
    summary: NucleiSummary | None = None
    out_downsample: float | None = None  # level-0 pixels per pixel of the id image; None when nothing was run
    mpp: float | None = None  # micrometres per pixel of the id image (the table is in level-0 px and um)


def _summary(classes: list[str], names: list[str], areas: np.ndarray, plan: Plan, mpp: float) -> NucleiSummary:
    counts = {c: 0 for c in classes}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    summary = NucleiSummary(list(classes), counts, float(np.median(areas)) if len(areas) else None)
    if plan.tissue_fraction is not None:
        _, _, w, h = plan.region
        summary.tissue_mm2 = plan.tissue_fraction * w * h * mpp**2 / 1e6
    return summary


LONG_RUN_SECONDS = 120  # a run estimated longer than this on a CPU is worth a word before it starts


def cpu_cost(plan: Plan, segmenter, advice: str = "use a GPU, or a smaller region") -> tuple[float, str] | None:
    """Seconds the run of `plan` takes on this CPU, and the words for it, from the model's measured seconds per
    megapixel; None when the model runs elsewhere or gives no figure. A GPU model's long run says so."""
    rate = getattr(segmenter, "cpu_seconds_per_megapixel", None)
    device = getattr(segmenter, "device", "cpu")
    if not rate or str(getattr(device, "type", device)) != "cpu":
        return None
    seconds = plan.tissue_tiles * plan.tile**2 / 1e6 * rate
    text = f"{plan.tissue_tiles} tiles of {plan.tile} px: about {duration(seconds)} on this CPU"
    if getattr(segmenter, "gpu_model", False) and seconds > LONG_RUN_SECONDS:
        text += f" (a GPU model: {advice})"
    return seconds, text


def _plan(slide, segmenter, region, out_downsample, tile, overlap, skip_background, batch_size, readers) -> Plan:
    if getattr(segmenter, "kind", None) != "instance":
        raise SegmentError(f"{type(segmenter).__name__} is not an instance model (kind must be 'instance')")
    halo = int(getattr(segmenter, "overlap", 0))
    if overlap is not None and overlap < halo:
        raise SegmentError(
            f"an overlap of {overlap} px is less than the model's halo of {halo} px: nuclei at tile borders would "
            f"be cut or lost; use at least {halo} (or leave the overlap to the model)"
        )
    check_tile = getattr(segmenter, "check_tile", None)
    if tile is not None and check_tile is not None:
        check_tile(int(tile))
    plan = plan_run(slide, segmenter, region, out_downsample, tile, overlap, skip_background)
    check_memory(plan, 1, batch_size, readers, _level_ratio(slide, plan))
    return plan


def segment_instances_region(
    slide: Slide,
    segmenter,
    region: tuple[float, float, float, float] | None = None,
    *,
    out_downsample: float | str = 1.0,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    readers: int | None = None,
    skip_background: bool = True,
    polygons: bool = False,
    progress: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> InstanceRegionResult:
    """Nuclei of `region` (x, y, w, h in level-0 pixels; default the whole slide) as an id image and a list.

    `polygons`: also outline each object (for GeoJSON). A cancelled run returns what
    it finished (`stats.complete` False); rows it did not reach are 0.
    """
    plan = _plan(slide, segmenter, region, out_downsample, tile, overlap, skip_background, batch_size, readers)
    height, width = plan.out_shape
    if height * width * 4 > MAX_REGION_BYTES:
        raise SegmentError(
            f"the result of a {width} x {height} region would take {height * width * 4 / 1024**3:.1f} GiB of "
            "memory: write it to a file (nephro segment --out, or 'whole slide' in napari) or use a coarser output"
        )
    sink = RegionInstances((height, width))
    stats = run_instance_tiles(
        slide,
        segmenter,
        plan,
        sink,
        polygons=polygons,
        batch_size=batch_size,
        readers=readers,
        progress=progress,
        cancel=cancel,
    )
    mpp = slide_mpp(slide)
    classes = list(segmenter.classes)
    summary = None
    if stats.complete:
        names = [class_name(classes, n.cls) for n in sink.nuclei]
        summary = _summary(classes, names, np.array([n.area_um2 for n in sink.nuclei]), plan, mpp)
    return InstanceRegionResult(
        sink.array,
        sink.nuclei,
        plan.region,
        plan.out_downsample,
        output_mpp(mpp, plan.out_downsample),
        classes,
        stats,
        summary,
    )


def segment_instances_slide(
    slide: Slide,
    segmenter,
    out: str | os.PathLike[str],
    *,
    region: tuple[float, float, float, float] | None = None,
    out_downsample: float | str = WORKING,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    readers: int | None = None,
    skip_background: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> InstanceSlideResult:
    """Nuclei of the slide (or `region`) into `out`: .zarr (uint32 ids, table inside), .csv, .parquet, .geojson.

    The id image is at the model's working scale unless `out_downsample` says otherwise
    (FULL: level 0); the table's centroids and areas are measured on the working grid
    in level-0 pixels and um² whatever the image's scale.
    Rows go to `<out>.partial.zarr` band by band with the table beside them;
    cancelled or killed, `resume=True` computes only the rest and gives the same
    nuclei, with the same ids, as an uninterrupted run.
    """
    out = Path(out)
    if out.suffix.lower() not in INSTANCE_SUFFIXES:
        raise SegmentError(f"{out}: nuclei are written to .zarr (labels), .geojson (detections), .csv or .parquet")
    if out.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise SegmentError(f"{out}: Parquet needs pyarrow (pip install pyarrow); or write a .csv table") from None
    if check_output(out, overwrite=overwrite, resume=resume, allowed=INSTANCE_SUFFIXES):
        return InstanceSlideResult(out, partial_path(out), 0, 0, RunStats(0, 0, 0, 0.0, 0.0, True))
    plan = _plan(slide, segmenter, region, out_downsample, tile, overlap, skip_background, batch_size, readers)
    try:
        with exclusive(out):
            if check_output(out, overwrite=overwrite, resume=resume, locked=True, allowed=INSTANCE_SUFFIXES):
                return InstanceSlideResult(out, partial_path(out), 0, 0, RunStats(0, 0, 0, 0.0, 0.0, True))
            return _run(slide, segmenter, plan, out, batch_size, readers, resume, progress, cancel)
    except Locked as exc:
        raise SegmentError(str(exc)) from None


def _run(slide, segmenter, plan, out, batch_size, readers, resume, progress, cancel) -> InstanceSlideResult:
    mpp = slide_mpp(slide)
    classes = list(segmenter.classes)
    polygons = out.suffix.lower() == ".geojson"
    identity = _json(
        {
            "kind": "instance",
            "slide": slide.source.name,
            "slide_shape": list(slide.level_shapes[0]),
            "slide_mpp": round(mpp, 9),
            "model": getattr(segmenter, "fingerprint", type(segmenter).__name__),
            "plan": plan.describe(),
            "polygons": polygons,
            "batch": batch_size,
            "device": _device_name(segmenter),
        }
    )
    partial = partial_path(out)
    if resume:
        store = ZarrRunStore.reopen(partial, identity, 0.5)
    else:
        d = plan.out_downsample
        height, width = slide.level_shapes[0]
        full = (cells(height, d), cells(width, d))
        offset = (round(plan.region[1] / d), round(plan.region[0] / d))
        record = {
            **identity,
            "classes": {},  # ids are objects, not classes: their classes are in the table
            "object_classes": classes,
            "rows": plan.out_shape[0],
            "cols": plan.out_shape[1],
            "name": f"{Path(slide.source).stem} {segmenter.classes[0] if len(classes) == 1 else 'objects'}",
        }
        try:
            store = ZarrRunStore.create(partial, full, offset, record, 0.5, mpp=output_mpp(mpp, d), dtype=np.uint32)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    sink = SlideInstances(store, classes, mpp, polygons, str(identity["model"]))
    rows = plan.out_shape[0]
    try:
        stats = run_instance_tiles(
            slide,
            segmenter,
            plan,
            sink,
            polygons=polygons,
            batch_size=batch_size,
            readers=readers,
            progress=progress,
            cancel=cancel,
        )
    except BaseException:
        sink.close()
        if not resume and store.rows_done == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    sink.close()
    d = plan.out_downsample
    if store.rows_done < rows:
        return InstanceSlideResult(None, partial, store.rows_done, rows, stats, None, d, output_mpp(mpp, d))
    summary = _table_summary(store.path / TABLE, classes, plan, mpp)
    path = finish_instances(store, out)
    return InstanceSlideResult(path, partial, rows, rows, stats, summary, d, output_mpp(mpp, d))


def _table_summary(table: Path, classes: list[str], plan: Plan, mpp: float) -> NucleiSummary:
    names, areas = [], []
    with open(table, newline="") as f:
        for row in csv.DictReader(f):
            names.append(row["class"])
            areas.append(float(row["area_um2"]))
    return _summary(classes, names, np.array(areas), plan, mpp)


def read_nuclei_table(path: str | os.PathLike[str]) -> list[dict]:
    """The table of a nuclei run: a .csv, a .parquet, or the `nuclei.csv` inside a .zarr output."""
    path = Path(path)
    if path.suffix.lower() == ".zarr" or path.is_dir():
        path = path / TABLE
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["id"] = int(row["id"])
        for key in ("score", "x_um", "y_um", "area_um2", "x_px", "y_px"):
            row[key] = float(row[key])
    return rows
