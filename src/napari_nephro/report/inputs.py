"""What a report reads: the slide's tissue, a glomerulus output placed on the slide, a nuclei table.

A glomerulus output may be at any scale (full resolution, or the model's working
grid, coarser than the slide): it is placed through its own pixel size relative to
the slide's, so the numbers do not depend on the scale it was written at.

The tissue area is the engine's tissue detection with its holes filled: glass
enclosed by the section (tubular lumens, vessels, cracks) counts as tissue, as a
pathologist measures a section. It is therefore larger than the tissue share the
engine gives its tiles (which only decides where the model runs).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..annotations import AnnotationError, AnnotationSet
from ..annotations.omezarr import LabelPyramid
from ..common.paths import path_problem
from ..inference.plan import THUMBNAIL_SIDE, cells
from ..io import Slide, SlideError, open_slide
from ..tiling import read_scaled, tissue_mask
from .errors import ReportError

TISSUE_UM = 4.0  # the tissue map is no finer than this (µm per pixel): a tubule's pale lumen averages into its walls
LABEL_SUFFIXES = (".zarr", ".tif", ".tiff")
POLYGON_SUFFIXES = (".geojson", ".json", ".xml")
NUCLEI_SUFFIXES = (".zarr", ".csv", ".parquet")
XY = ("x_px", "y_px")  # the nuclei table's columns a report reads: level-0 centroids


@dataclass(frozen=True)
class ClassLabels:
    """A class-id label image placed on a slide: label pixel (i, j) covers level-0 x in [ox + j * d, ox + (j + 1) * d).

    `levels`: level 0 first (numpy, dask or zarr arrays), each `level_downsamples[k]`
    times coarser than level 0; `downsample` (d) is level-0 slide pixels per label pixel.
    """

    levels: list
    downsample: float
    classes: dict[int, str] = field(default_factory=dict)
    origin: tuple[float, float] = (0.0, 0.0)  # (x, y) of the image's corner in level-0 slide pixels
    level_downsamples: list[float] = field(default_factory=lambda: [1.0])

    @property
    def array(self):
        return self.levels[0]


@dataclass(frozen=True)
class Tissue:
    """The slide's thumbnail the tissue was found on, the section on it (holes filled), its level-0 px per pixel."""

    rgb: np.ndarray
    mask: np.ndarray
    step: float
    mpp: float  # the slide's µm per level-0 pixel

    @property
    def area_um2(self) -> float:
        return float(self.mask.sum()) * (self.step * self.mpp) ** 2


@contextmanager
def opened_slide(slide: Slide | str | os.PathLike[str], mpp: float | None = None) -> Iterator[Slide]:
    """The slide, opened (and closed after) when given by path; `mpp` sets the pixel size of one that does not say."""
    if isinstance(slide, Slide):
        if mpp is not None:
            slide.set_mpp(mpp)
        yield slide
        return
    try:
        opened = open_slide(slide, mpp=mpp)
    except SlideError as exc:
        raise ReportError(str(exc)) from None
    with opened:
        yield opened


def tissue(slide: Slide, mpp: float, side: int = THUMBNAIL_SIDE) -> Tissue:
    """The section on a thumbnail at most `side` px and no finer than TISSUE_UM (see `tissue_map`)."""
    from scipy import ndimage

    height, width = slide.level_shapes[0]
    step = max(1.0, TISSUE_UM / mpp, max(height, width) / side)
    rows, cols = cells(height, step), cells(width, step)
    rgb = np.asarray(read_scaled(slide, (0, 0, cols * step, rows * step), (rows, cols)))
    return Tissue(rgb, ndimage.binary_fill_holes(tissue_mask(rgb)), step, mpp)


def tissue_map(slide: Slide, mpp: float, side: int = THUMBNAIL_SIDE) -> tuple[np.ndarray, float]:
    """The section on a thumbnail of the slide, and the thumbnail's level-0 px per pixel.

    The engine's detection (`tiling.tissue_mask`), with holes filled: glass enclosed by
    tissue (lumens, vessels, cracks) is part of the section's area, and filled the area
    barely depends on the thumbnail's scale (within 1 % from 2 to 16 µm/px on our slides).
    """
    found = tissue(slide, mpp, side)
    return found.mask, found.step


def tissue_area_um2(slide: Slide, mpp: float) -> float:
    """Tissue area of the whole slide in µm²: the thumbnail's tissue pixels (holes filled) times their area."""
    return tissue(slide, mpp).area_um2


def read_glomeruli(path: str | os.PathLike[str]) -> LabelPyramid | AnnotationSet:
    """A glomerulus output: a class-id label image (.zarr, label .tif; place it with `place`), or polygons (GeoJSON)."""
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
    return pyramid


def place(pyramid: LabelPyramid, slide: Slide, slide_mpp: float, name: str) -> ClassLabels:
    """The output on `slide`: its pixel size over the slide's, else its run's grid, else the ratio of the widths.

    An output of another slide (a run record naming another size, or extents that
    differ by more than a label pixel) is refused: its numbers would be someone else's.
    """
    height, width = slide.level_shapes[0]
    shape = pyramid.slide_shape
    if shape is not None and tuple(shape) != (height, width):
        raise ReportError(
            f"{name}: was made from a slide of {shape[1]}x{shape[0]} px, not {slide.source.name} ({width}x{height} px)"
        )
    lh, lw = pyramid.levels[0].shape[-2:]
    if pyramid.mpp:
        d = float(pyramid.mpp) / slide_mpp
    elif shape is not None:  # a run's record, without a pixel size in the file
        d = pyramid.slide_downsample
    else:
        d = width / lw
    if abs(lh - height / d) > 1 + 1e-6 or abs(lw - width / d) > 1 + 1e-6:
        um = f"{lw * d * slide_mpp:.0f}x{lh * d * slide_mpp:.0f} µm"
        raise ReportError(
            f"{name}: covers {um} at {d * slide_mpp:.4g} µm/px, but {slide.source.name} is "
            f"{width * slide_mpp:.0f}x{height * slide_mpp:.0f} µm: not this slide's output (or a wrong pixel size)"
        )
    return ClassLabels(list(pyramid.levels), d, dict(pyramid.classes), (0.0, 0.0), list(pyramid.downsamples))


def read_nuclei(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict | None]:
    """Nuclei centroids (n, 2) as level-0 x, y px from a nuclei output (.zarr with its table, .csv, .parquet), and its run record."""
    from ..inference.instance_output import TABLE

    path = Path(path)
    if problem := path_problem(path):
        raise ReportError(f"{path}: {problem}")
    suffix = path.suffix.lower()
    if suffix not in NUCLEI_SUFFIXES:
        raise ReportError(
            f"{path}: a nuclei output is a .zarr, .csv or .parquet of `nephro segment`, not {path.suffix}"
        )
    run = None
    try:
        if suffix == ".zarr":
            run = _zarr_run(path)
            xy = _csv_xy(path / TABLE)
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ReportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
            table = pq.read_table(path, columns=list(XY))
            xy = np.stack([table.column(c).to_numpy().astype(np.float64) for c in XY], axis=1)
        else:
            xy = _csv_xy(path)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        what = f"{exc.__class__.__name__}: {exc}" if not isinstance(exc, KeyError) else f"no column {exc}"
        raise ReportError(f"{path}: not a nuclei table of napari-nephro ({what})") from None
    except Exception as exc:  # pyarrow's own errors for a file that is no Parquet, or lacks the columns
        raise ReportError(f"{path}: not a readable nuclei table ({exc.__class__.__name__})") from None
    return xy.reshape(-1, 2), run


def _csv_xy(path: Path) -> np.ndarray:
    """The x_px, y_px columns of a nuclei CSV."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        missing = [c for c in XY if c not in header]
        if missing:
            raise KeyError(missing[0])
        ix, iy = header.index(XY[0]), header.index(XY[1])
        return np.array([(float(r[ix]), float(r[iy])) for r in reader if r], np.float64).reshape(-1, 2)


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
    """The run record of a nuclei store (its root attributes only: the pixels are not needed)."""
    import zarr

    from ..annotations.omezarr import RUN_KEY

    try:
        attrs = zarr.open_group(store=str(path), mode="r").attrs.asdict()
    except Exception:  # zarr raises several types for a folder that is no store
        return None
    run = attrs.get("ome", attrs).get(RUN_KEY) or attrs.get(RUN_KEY)
    return run if isinstance(run, dict) else None
