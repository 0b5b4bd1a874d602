"""What a report reads: the slide's tissue, a glomerulus output placed on the slide, a nuclei table.

A glomerulus output may be at any scale (full resolution, or the model's working
grid, coarser than the slide): it is placed through its own pixel size relative to
the slide's, so the numbers do not depend on the scale it was written at.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..annotations import AnnotationError, AnnotationSet
from ..common.paths import path_problem
from ..io import Slide, SlideError, open_slide
from ..tiling import read_scaled, tissue_mask
from .errors import ReportError

TISSUE_SIDE = 2048  # the tissue map is read at most this large (as the engine's, inference/plan.py)
TISSUE_UM = 4.0  # and no finer than this (µm per pixel): a tubule's pale lumen averages into its walls
LABEL_SUFFIXES = (".zarr", ".tif", ".tiff")
POLYGON_SUFFIXES = (".geojson", ".json", ".xml")
NUCLEI_SUFFIXES = (".zarr", ".csv", ".parquet")


@dataclass
class ClassLabels:
    """A class-id label image on a slide: label pixel (i, j) covers level-0 x in [ox + j * d, ox + (j + 1) * d).

    `levels`: level 0 first (numpy, dask or zarr arrays), each `level_downsamples[k]`
    times coarser than level 0; `downsample` (d) is level-0 slide pixels per label pixel.
    """

    levels: list
    downsample: float
    classes: dict[int, str] = field(default_factory=dict)
    origin: tuple[float, float] = (0.0, 0.0)  # (x, y) of the image's corner in level-0 slide pixels
    level_downsamples: list[float] = field(default_factory=lambda: [1.0])
    run: dict | None = None  # the run record of the output, when a run of napari-nephro wrote it
    mpp: float | None = None  # µm per label pixel, as the file says (None: unknown)

    @property
    def array(self):
        return self.levels[0]


def as_slide(slide: Slide | str | os.PathLike[str], mpp: float | None = None) -> Slide:
    """An opened slide; `mpp` sets the pixel size of one that does not say (or says wrong)."""
    if isinstance(slide, Slide):
        if mpp is not None:
            slide.set_mpp(mpp)
        return slide
    try:
        return open_slide(slide, mpp=mpp)
    except SlideError as exc:
        raise ReportError(str(exc)) from None


def tissue_map(slide: Slide, mpp: float, side: int = TISSUE_SIDE) -> tuple[np.ndarray, float]:
    """The section on a thumbnail of the slide, and the thumbnail's level-0 px per pixel.

    The engine's detection (`tiling.tissue_mask`), with holes filled: glass enclosed by
    tissue (lumens, vessels, cracks) is part of the section's area, and filled the area
    barely depends on the thumbnail's scale (within 1 % from 2 to 16 µm/px on our slides).
    """
    from scipy import ndimage

    height, width = slide.level_shapes[0]
    step = max(1.0, TISSUE_UM / mpp, max(height, width) / side)
    rows, cols = max(1, math.ceil(height / step - 1e-6)), max(1, math.ceil(width / step - 1e-6))
    thumb = read_scaled(slide, (0, 0, cols * step, rows * step), (rows, cols))
    return ndimage.binary_fill_holes(tissue_mask(thumb)), step


def tissue_area_um2(slide: Slide, mpp: float) -> float:
    """Tissue area of the whole slide in µm²: the thumbnail's tissue pixels times their area."""
    mask, step = tissue_map(slide, mpp)
    return float(mask.sum()) * (step * mpp) ** 2


def read_glomeruli(path: str | os.PathLike[str]) -> ClassLabels | AnnotationSet:
    """A glomerulus output: a class-id label image (.zarr, label .tif) unplaced (see `place`), or polygons (GeoJSON)."""
    from ..annotations import read_annotations
    from ..annotations.labeltiff import read_label_tiff_pyramid
    from ..annotations.omezarr import read_label_zarr, refuse_unfinished

    path = Path(path)
    if problem := path_problem(path):
        raise ReportError(f"{path}: {problem}")
    suffix = path.suffix.lower()
    try:
        if suffix in POLYGON_SUFFIXES:
            return read_annotations(path)
        if suffix not in LABEL_SUFFIXES:
            raise ReportError(
                f"{path}: a glomerulus output is a label image (.zarr, .tif) or polygons (.geojson), not {suffix or 'a folder'}"
            )
        if suffix == ".zarr":
            pyramid = read_label_zarr(path)
            refuse_unfinished(pyramid, path)
        else:
            pyramid = read_label_tiff_pyramid(path)
    except AnnotationError as exc:
        raise ReportError(str(exc)) from None
    if np.dtype(pyramid.levels[0].dtype).kind not in "ui":
        raise ReportError(f"{path}: label values must be integers, not {pyramid.levels[0].dtype}")
    levels, downsamples = list(pyramid.levels), list(pyramid.downsamples)
    run = pyramid.run if suffix == ".zarr" else _tiff_run(path)
    return ClassLabels(levels, float("nan"), dict(pyramid.classes), (0.0, 0.0), downsamples, run, pyramid.mpp)


def _tiff_run(path: Path) -> dict | None:
    """The run record a label TIFF keeps in its description (written by runs at the working scale), if any."""
    from ..annotations import labeltiff

    reader = getattr(labeltiff, "read_label_tiff_run", None)
    return reader(path) if reader is not None else None


def place(labels: ClassLabels, slide: Slide, slide_mpp: float, name: str) -> ClassLabels:
    """Set the output's downsample on `slide`: its pixel size over the slide's, else its run's plan, else the shapes.

    An output of another slide (a run record naming another size, or extents that
    differ by more than a label pixel) is refused: its numbers would be someone else's.
    """
    height, width = slide.level_shapes[0]
    run = labels.run or {}
    shape = run.get("slide_shape")
    if isinstance(shape, list) and [int(v) for v in shape] != [height, width]:
        raise ReportError(
            f"{name}: was made from a slide of {shape[1]}x{shape[0]} px, not {slide.source.name} ({width}x{height} px)"
        )
    mpp = labels.mpp
    plan_d = (run.get("plan") or {}).get("out_downsample") if isinstance(run.get("plan"), dict) else None
    if mpp:
        d = float(mpp) / slide_mpp
    elif isinstance(plan_d, int | float) and plan_d > 0:
        d = float(plan_d)
    else:
        d = width / labels.array.shape[-1]
    lh, lw = labels.array.shape[-2:]
    if abs(lh - height / d) > 1 + 1e-6 or abs(lw - width / d) > 1 + 1e-6:
        um = f"{lw * d * slide_mpp:.0f}x{lh * d * slide_mpp:.0f} µm"
        raise ReportError(
            f"{name}: covers {um} at {d * slide_mpp:.4g} µm/px, but {slide.source.name} is "
            f"{width * slide_mpp:.0f}x{height * slide_mpp:.0f} µm: not this slide's output (or a wrong pixel size)"
        )
    labels.downsample = d
    return labels


def read_nuclei(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict | None]:
    """Nuclei centroids (n, 2) as level-0 x, y px from a nuclei output (.zarr with its table, .csv, .parquet), and its run record."""
    from ..inference.instance_api import read_nuclei_table

    path = Path(path)
    if problem := path_problem(path):
        raise ReportError(f"{path}: {problem}")
    if path.suffix.lower() not in NUCLEI_SUFFIXES:
        raise ReportError(
            f"{path}: a nuclei output is a .zarr, .csv or .parquet of `nephro segment`, not {path.suffix}"
        )
    try:
        rows = read_nuclei_table(path)
        xy = np.array([(float(r["x_px"]), float(r["y_px"])) for r in rows], np.float64).reshape(-1, 2)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        what = f"{exc.__class__.__name__}: {exc}" if not isinstance(exc, KeyError) else f"no column {exc}"
        raise ReportError(f"{path}: not a nuclei table of napari-nephro ({what})") from None
    except Exception as exc:  # pyarrow's own errors for a file that is no Parquet
        raise ReportError(f"{path}: not a readable nuclei table ({exc.__class__.__name__})") from None
    return xy, _zarr_run(path) if path.suffix.lower() == ".zarr" else None


def check_nuclei(xy: np.ndarray, slide: Slide, name: str) -> None:
    """Refuse centroids beyond the slide (by more than a pixel): the table of another slide."""
    if not len(xy):
        return
    height, width = slide.level_shapes[0]
    x, y = xy[:, 0], xy[:, 1]
    if x.min() < -1 or y.min() < -1 or x.max() > width + 1 or y.max() > height + 1:
        raise ReportError(
            f"{name}: nuclei lie outside {slide.source.name} ({width}x{height} px), up to x={x.max():.0f}, "
            f"y={y.max():.0f}: not this slide's nuclei"
        )


def _zarr_run(path: Path) -> dict | None:
    from ..annotations.omezarr import read_label_zarr

    try:
        return read_label_zarr(path).run
    except AnnotationError:
        return None
