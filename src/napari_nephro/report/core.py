"""A per-biopsy report: the numbers a renal pathologist writes down for one slide.

Tissue area, glomeruli (count, per class, how many globally / segmentally
sclerosed, their areas) and nuclei (count, density in the tissue, inside and
outside glomeruli), from the results of `nephro segment` or from arrays in memory
(the napari widget). One `row()` per slide, the same columns for every slide and
every run, so cohort tables and batch summaries can be compared and joined.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..annotations import AnnotationSet
from ..annotations.omezarr import LabelPyramid
from ..io import Slide
from .errors import ReportError
from .inputs import ClassLabels, Tissue, check_nuclei, opened_slide, place, read_glomeruli, read_nuclei, tissue
from .measure import Objects, label_objects, polygon_objects

# The row's columns, in order; units in the names (mm², µm², per mm² of tissue, per cent).
COLUMNS = (
    "slide",
    "slide_mpp",
    "tissue_mm2",
    "glomeruli",
    "glomeruli_per_mm2",
    "glomeruli_by_class",
    "globally_sclerosed",
    "segmentally_sclerosed",
    "global_sclerosis_pct",
    "glomerular_area_total_um2",
    "glomerular_area_mean_um2",
    "glomerular_area_median_um2",
    "glomerular_area_min_um2",
    "glomerular_area_max_um2",
    "nuclei",
    "nuclei_per_mm2",
    "nuclei_in_glomeruli",
    "nuclei_in_glomeruli_per_mm2",
    "nuclei_outside_glomeruli",
    "nuclei_outside_glomeruli_per_mm2",
    "glomeruli_mpp",
    "models",
    "error",
)
GLOBAL, SEGMENTAL = "global", "segmental"  # class names holding these words (any case) count as such sclerosis


@dataclass
class BiopsyReport:
    """One slide's numbers; None where a number does not apply (no such output, no such classes, nothing to divide by)."""

    slide: str
    slide_mpp: float | None = None
    tissue_mm2: float | None = None
    glomeruli: int | None = None
    glomeruli_per_mm2: float | None = None
    glomeruli_by_class: str | None = None  # "normal: 12; segmental sclerosis: 2; global sclerosis: 3"
    globally_sclerosed: int | None = None
    segmentally_sclerosed: int | None = None
    global_sclerosis_pct: float | None = None
    glomerular_area_total_um2: float | None = None
    glomerular_area_mean_um2: float | None = None
    glomerular_area_median_um2: float | None = None
    glomerular_area_min_um2: float | None = None
    glomerular_area_max_um2: float | None = None
    nuclei: int | None = None
    nuclei_per_mm2: float | None = None
    nuclei_in_glomeruli: int | None = None
    nuclei_in_glomeruli_per_mm2: float | None = None
    nuclei_outside_glomeruli: int | None = None
    nuclei_outside_glomeruli_per_mm2: float | None = None
    glomeruli_mpp: float | None = None  # µm per pixel the glomeruli were measured at
    models: str | None = None  # "glomeruli: FINGERPRINT; nuclei: FINGERPRINT", from the outputs' run records
    error: str | None = None
    # not in the row: per glomerulus, for a label image ordered by the top-left corner of its bounding box
    # (topmost first, then leftmost), for polygons in file order
    glomerulus_areas_um2: list[float] = field(default_factory=list, repr=False)
    glomerulus_classes: list[str] = field(default_factory=list, repr=False)
    # not in the row either: what the page is drawn from, kept so it needs no second reading (None: not kept)
    placed: ClassLabels | AnnotationSet | None = field(default=None, repr=False, compare=False)
    tissue: Tissue | None = field(default=None, repr=False, compare=False)

    def row(self) -> dict:
        """The flat, CSV-ready row (COLUMNS in order)."""
        return {name: getattr(self, name) for name in COLUMNS}

    @classmethod
    def failed(cls, slide_name: str, error: str | BaseException) -> BiopsyReport:
        """The row of a slide whose report could not be made: its name and why."""
        return cls(slide=str(slide_name), error=" ".join(str(error).split()) or type(error).__name__)


def biopsy_report(
    slide: Slide | str | os.PathLike[str],
    glomeruli: str | os.PathLike[str] | None = None,
    nuclei: str | os.PathLike[str] | None = None,
    *,
    mpp: float | None = None,
) -> BiopsyReport:
    """The report of one slide from its outputs: a glomerulus label image (.zarr, .tif, any scale) or
    GeoJSON, and a nuclei output (.zarr, .csv, .parquet). `mpp` sets the slide's pixel size when the
    file lacks it (else the outputs' run record is asked). Raises ReportError for a user's mistake.

    The report keeps the placed glomeruli and the tissue thumbnail (not in its row), so
    `write_biopsy_html` draws its page without reading them again."""
    with opened_slide(slide, mpp) as opened:
        output = None if glomeruli is None else read_glomeruli(glomeruli)
        xy, nuclei_run = (None, None) if nuclei is None else read_nuclei(nuclei)
        glomeruli_run = output.run if isinstance(output, LabelPyramid) else None
        slide_mpp = opened.mpp or _recorded_mpp(glomeruli_run, nuclei_run)
        if not slide_mpp:
            raise ReportError(f"{opened.source.name}: its pixel size is unknown; give it (mpp=..., --mpp)")
        if xy is not None:
            check_nuclei(xy, opened, Path(nuclei).name)
        placed = place(output, opened, slide_mpp, Path(glomeruli).name) if isinstance(output, LabelPyramid) else output
        found = tissue(opened, slide_mpp)
        name = opened.source.name
    models = _models(glomeruli_run, nuclei_run)
    if isinstance(placed, AnnotationSet):
        report = report_from_polygons(
            placed, slide_mpp=slide_mpp, tissue_um2=found.area_um2, nuclei_xy=xy, slide_name=name, models=models
        )
    else:
        report = report_from_arrays(
            None if placed is None else placed.array,
            1.0 if placed is None else placed.downsample,
            None if placed is None else placed.classes,
            slide_mpp=slide_mpp,
            tissue_um2=found.area_um2,
            nuclei_xy=xy,
            slide_name=name,
            models=models,
        )
    report.placed, report.tissue = placed, found
    return report


def report_from_arrays(
    labels=None,
    downsample: float = 1.0,
    classes: dict[int, str] | None = None,
    *,
    slide_mpp: float,
    tissue_um2: float | None,
    nuclei_xy: np.ndarray | None = None,
    origin: tuple[float, float] = (0.0, 0.0),
    slide_name: str = "",
    models: str | None = None,
) -> BiopsyReport:
    """The report from data in memory: a class-id label array (numpy, dask or zarr; None: no glomeruli) whose
    pixels are `downsample` level-0 pixels wide, its corner at level-0 `origin` (x, y); nuclei centroids
    (n, 2) as level-0 x, y px; the tissue area in µm² (None: unknown)."""
    if labels is not None and np.ndim(labels) != 2:
        raise ReportError(f"a glomerulus label image must be 2-D, not shape {tuple(np.shape(labels))}")
    if not (downsample > 0 and slide_mpp and slide_mpp > 0):
        raise ReportError(f"a report needs a positive pixel size and downsample (got {slide_mpp} µm/px, {downsample})")
    objects = None
    if labels is not None:
        points = None
        if nuclei_xy is not None:
            points = (np.asarray(nuclei_xy, np.float64).reshape(-1, 2) - np.asarray(origin, np.float64)) / downsample
        objects = label_objects(labels, points)
    pixel_um2 = (downsample * slide_mpp) ** 2
    return _report(
        objects,
        dict(classes or {}),
        pixel_um2,
        slide_mpp=slide_mpp,
        tissue_um2=tissue_um2,
        nuclei_xy=nuclei_xy,
        slide_name=slide_name,
        models=models,
        glomeruli_mpp=None if labels is None else downsample * slide_mpp,
    )


def report_from_polygons(
    annotations: AnnotationSet,
    *,
    slide_mpp: float,
    tissue_um2: float | None,
    nuclei_xy: np.ndarray | None = None,
    slide_name: str = "",
    models: str | None = None,
) -> BiopsyReport:
    """The report from glomerulus polygons in level-0 px (each polygon part one glomerulus, its class its label)."""
    parts, values = [], []
    for ann in annotations:
        for part in ann.polygons():
            parts.append(part)
            values.append(annotations.class_id(ann.label))
    objects = polygon_objects(parts, nuclei_xy)
    objects.values = np.asarray(values, np.int64)
    classes = {annotations.class_id(c): c for c in annotations.classes}
    return _report(
        objects,
        classes,
        slide_mpp**2,
        slide_mpp=slide_mpp,
        tissue_um2=tissue_um2,
        nuclei_xy=nuclei_xy,
        slide_name=slide_name,
        models=models,
        glomeruli_mpp=None,
    )


def _report(
    objects: Objects | None,
    classes: dict[int, str],
    pixel_um2: float,
    *,
    slide_mpp: float,
    tissue_um2: float | None,
    nuclei_xy,
    slide_name: str,
    models: str | None,
    glomeruli_mpp: float | None,
) -> BiopsyReport:
    tissue_mm2 = None if tissue_um2 is None else tissue_um2 / 1e6
    report = BiopsyReport(slide=slide_name, slide_mpp=_r(slide_mpp, 6), tissue_mm2=_r(tissue_mm2, 4), models=models)
    report.glomeruli_mpp = _r(glomeruli_mpp, 4)
    glom_mm2 = None
    if objects is not None:
        areas = objects.areas_px.astype(np.float64) * pixel_um2
        names = [classes.get(int(v), f"class {int(v)}") for v in objects.values]
        n = len(areas)
        glom_mm2 = float(areas.sum()) / 1e6
        report.glomeruli = n
        report.glomeruli_per_mm2 = _per(n, tissue_mm2)
        report.glomerulus_areas_um2 = [round(float(a), 1) for a in areas]
        report.glomerulus_classes = names
        order = [classes[k] for k in sorted(classes)] + sorted({x for x in names if x not in classes.values()})
        report.glomeruli_by_class = "; ".join(f"{c}: {names.count(c)}" for c in order) or None
        sclerosis = _sclerosis(classes)
        if sclerosis is not None:
            global_ids, segmental_ids = sclerosis
            values = objects.values.tolist()
            report.globally_sclerosed = sum(v in global_ids for v in values)
            report.segmentally_sclerosed = sum(v in segmental_ids for v in values)
            report.global_sclerosis_pct = _r(100 * report.globally_sclerosed / n, 2) if n else None
        report.glomerular_area_total_um2 = round(float(areas.sum()), 1)
        if n:
            report.glomerular_area_mean_um2 = round(float(areas.mean()), 1)
            report.glomerular_area_median_um2 = round(float(np.median(areas)), 1)
            report.glomerular_area_min_um2 = round(float(areas.min()), 1)
            report.glomerular_area_max_um2 = round(float(areas.max()), 1)
    if nuclei_xy is not None:
        total = len(nuclei_xy)
        report.nuclei = total
        report.nuclei_per_mm2 = _per(total, tissue_mm2)
        if objects is not None and objects.hits is not None:
            inside = int((objects.hits >= 0).sum())
            report.nuclei_in_glomeruli = inside
            report.nuclei_outside_glomeruli = total - inside
            report.nuclei_in_glomeruli_per_mm2 = _per(inside, glom_mm2)
            outside_mm2 = None if tissue_mm2 is None else tissue_mm2 - glom_mm2
            report.nuclei_outside_glomeruli_per_mm2 = _per(total - inside, outside_mm2)
    return report


def _sclerosis(classes: dict[int, str]) -> tuple[set[int], set[int]] | None:
    """The class values of global and of segmental sclerosis; None when the model has neither."""
    global_ids = {k for k, v in classes.items() if GLOBAL in v.lower()}
    segmental_ids = {k for k, v in classes.items() if SEGMENTAL in v.lower()}
    return (global_ids, segmental_ids) if global_ids or segmental_ids else None


def _per(count: int, mm2: float | None) -> float | None:
    return None if mm2 is None or mm2 <= 0 else round(count / mm2, 2)


def _r(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def _recorded_mpp(glomeruli_run: dict | None, nuclei_run: dict | None) -> float | None:
    """The slide's pixel size as a run recorded it (a slide file without one, run with --mpp)."""
    for run in (glomeruli_run, nuclei_run):
        value = (run or {}).get("slide_mpp")
        if isinstance(value, int | float) and value > 0:
            return float(value)
    return None


def _models(glomeruli_run: dict | None, nuclei_run: dict | None) -> str | None:
    parts = [
        f"{what}: {run['model']}"
        for what, run in (("glomeruli", glomeruli_run), ("nuclei", nuclei_run))
        if isinstance(run, dict) and run.get("model")
    ]
    return "; ".join(parts) or None
