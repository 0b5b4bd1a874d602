"""The main job end to end, offline: the default model over a slide, the result as files (no napari here).

Used by `nephro demo --headless`, and by `nephro demo`, which then shows the same
files in napari.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import Slide
from ..tiling import read_scaled

OVERVIEW_SIDE = 1600
MIN_GLOMERULUS_UM2 = 2000.0  # a glomerulus cut anywhere is larger (about 50 um across): smaller pieces are noise
GREEN = np.array([0, 200, 0], np.float32)


@dataclass
class DemoResult:
    slide: Slide
    labels: Path  # OME-Zarr label image at the slide's full resolution
    geojson: Path  # one polygon per glomerulus, for QuPath
    overview: Path  # PNG: the slide with the glomeruli outlined
    objects: int  # glomeruli: connected pieces of at least MIN_GLOMERULUS_UM2
    fragments: int  # smaller pieces, left out of the GeoJSON (they stay in the label image)
    seconds: float


def slide_stem(slide: Slide) -> str:
    name = Path(slide.source).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def run_demo_job(
    slide: Slide,
    out_dir: str | os.PathLike[str],
    *,
    model: str = "default",
    device: str = "auto",
    progress: Callable | None = None,
    overwrite: bool = False,
) -> DemoResult:
    """Segment the whole slide with `model` into `out_dir`: labels (.zarr), objects (.geojson), overview (.png).

    The three files are named after the slide. Those of an earlier run are replaced
    only with `overwrite`; nothing else in the folder is ever touched, and a refused
    run (a wrong model, results already there) leaves no folder behind.
    """
    from ..annotations import AnnotationSet, write_geojson
    from ..annotations.omezarr import read_label_zarr
    from ..inference import segment_slide
    from ..inference.output import class_objects
    from ..models import TorchSegmenter

    out_dir = Path(out_dir)
    stem = slide_stem(slide)
    outputs = demo_outputs(out_dir, stem)
    check_demo_output(out_dir, outputs, overwrite=overwrite)
    segmenter = TorchSegmenter.from_checkpoint(model, device=device)
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    labels_path, geojson_path, overview_path = outputs
    try:
        result = segment_slide(slide, segmenter, labels_path, overwrite=True, progress=progress)
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # the folder this run made, if it is still empty
        raise
    pyramid = read_label_zarr(labels_path)
    pieces = class_objects(pyramid.levels[0], pyramid.classes)
    min_px = MIN_GLOMERULUS_UM2 / (slide.mpp or 1.0) ** 2
    objects = AnnotationSet([a for a in pieces if a.area >= min_px], classes=pieces.classes)
    geojson = write_geojson(objects, geojson_path, overwrite=True)
    overview = write_overview(slide, pyramid, overview_path)
    fragments = len(pieces) - len(objects)
    return DemoResult(slide, labels_path, geojson, overview, len(objects), fragments, result.stats.seconds)


def demo_outputs(out_dir: Path, stem: str) -> tuple[Path, Path, Path]:
    """Labels, polygons and overview of the demo on the slide named `stem`."""
    return (out_dir / f"{stem}.glomeruli.zarr", out_dir / f"{stem}.glomeruli.geojson", out_dir / f"{stem}.overview.png")


def check_demo_output(out_dir: Path, outputs: tuple[Path, ...], *, overwrite: bool) -> None:
    """Refuse a folder we cannot write, or earlier results without `overwrite`, before any model is loaded."""
    from ..inference.errors import SegmentError

    if out_dir.exists() and not out_dir.is_dir():
        raise SegmentError(f"{out_dir}: is a file, not a folder for the results")
    there = [p.name for p in outputs if p.exists()]
    if there and not overwrite:
        raise SegmentError(
            f"{out_dir}: holds the results of an earlier run ({', '.join(there)}); pass --overwrite to replace them"
        )


def write_overview(slide: Slide, pyramid, path: Path) -> Path:
    """The slide at most OVERVIEW_SIDE px wide, objects tinted and outlined in green."""
    from scipy import ndimage

    from .._atomic import atomic_output

    height, width = slide.level_shapes[0]
    scale = max(1.0, max(height, width) / OVERVIEW_SIDE)
    size = (max(1, round(height / scale)), max(1, round(width / scale)))
    rgb = read_scaled(slide, (0, 0, size[1] * scale, size[0] * scale), size).astype(np.float32)
    level = max((i for i, d in enumerate(pyramid.downsamples) if d <= scale), default=0)
    labels = np.asarray(pyramid.levels[level])
    mask = np.asarray(Image.fromarray(labels > 0).resize((size[1], size[0]), Image.Resampling.NEAREST))
    outline = mask & ~ndimage.binary_erosion(mask, iterations=2)
    rgb[mask] = 0.65 * rgb[mask] + 0.35 * GREEN
    rgb[outline] = GREEN
    with atomic_output(path) as tmp:
        Image.fromarray(rgb.astype(np.uint8)).save(tmp, format="PNG")
    return path
