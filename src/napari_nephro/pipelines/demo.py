"""The main job end to end, offline: the default models over a slide, the results as files (no napari here).

Glomeruli with the shipped glomerulus model, then nuclei with the shipped nuclei
model (`nuclei`, offline on a CPU), each written beside the other.

Used by `nephro demo --headless`, and by `nephro demo`, which then shows the same
files in napari. Given the slide's annotated glomeruli (the sample slide has them),
the job also says how many it found: a count alone cannot tell a good model from
one that paints every pink blob.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..annotations import AnnotationSet
from ..evaluation.instances import MatchResult
from ..evaluation.tpfpfn import FN, FP, TP, TPFPFN_COLORS
from ..io import Slide
from ..tiling import read_scaled

OVERVIEW_SIDE = 1600
DEMO_IOU = 0.5  # a found glomerulus is the annotated one when they overlap this much (the papers' threshold)
GREEN, YELLOW, RED = (np.array(TPFPFN_COLORS[k], np.float32) for k in (TP, FP, FN))  # found, false, missed


@dataclass
class DemoResult:
    slide: Slide
    labels: Path  # OME-Zarr label image at the slide's full resolution
    geojson: Path  # one polygon per glomerulus, for QuPath
    overview: Path  # PNG: the slide with the glomeruli outlined
    objects: int  # glomeruli: the label image's objects, after the model's own object rules
    summary: str  # "5 glomeruli found, 7,700 to 38,000 um2 (median ...)"
    warning: str | None  # when what was found cannot be glomeruli
    seconds: float
    match: MatchResult | None = None  # the GeoJSON's objects against the annotated ones, when given
    nuclei: Path | None = None  # OME-Zarr nucleus ids (table inside), when a nuclei model ran
    nuclei_summary: str | None = None  # "12,345 nuclei, 3,100 per mm² of tissue (...)"
    nuclei_seconds: float = 0.0
    nuclei_terms: str = ""  # the nuclei model's training data's terms, for the user to read

    def describe_match(self) -> str | None:
        """The match in words, or None without annotations."""
        return None if self.match is None else describe_match(self.match)


def describe_match(m: MatchResult) -> str:
    """'5 of 6 annotated glomeruli found (IoU ≥ 0.5), 1 false positive'."""
    what = "glomerulus" if m.n_true == 1 else "glomeruli"
    false = f"{m.fp} false positive{'' if m.fp == 1 else 's'}"
    return f"{m.tp} of {m.n_true} annotated {what} found (IoU ≥ {m.threshold:g}), {false}"


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
    truth: AnnotationSet | None = None,
    nuclei_model: str | None = "nuclei",
    nuclei_progress: Callable | None = None,
) -> DemoResult:
    """Segment the whole slide with `model` into `out_dir`: labels (.zarr), objects (.geojson), overview (.png).

    The three files are named after the slide. Those of an earlier run are replaced
    only with `overwrite`; nothing else in the folder is ever touched, and a refused
    run (a wrong model, results already there, annotations off the slide) leaves no
    folder behind. With `truth` (level-0 polygons) the objects are matched to it and
    the overview colours them found, false and missed. `nuclei_model` (None: none)
    then finds the slide's nuclei into a fourth file, `<stem>.nuclei.zarr`.
    """
    from ..annotations import write_geojson
    from ..annotations.model import require_inside
    from ..annotations.omezarr import read_label_zarr
    from ..inference import segment_slide
    from ..inference.output import class_objects
    from ..models import TorchSegmenter

    out_dir = Path(out_dir)
    stem = slide_stem(slide)
    outputs = demo_outputs(out_dir, stem)
    nuclei_path = out_dir / f"{stem}.nuclei.zarr"
    check_demo_output(out_dir, (*outputs, nuclei_path) if nuclei_model else outputs, overwrite=overwrite)
    if truth is not None:
        require_inside(truth, slide.level_shapes[0], "the annotations")  # before minutes of work
    segmenter = TorchSegmenter.from_checkpoint(model, device=device)
    nuclei_segmenter = None
    if nuclei_model is not None:
        from ..models.nuclei import load_nuclei_model

        nuclei_segmenter = load_nuclei_model(nuclei_model, device=device)
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
    # specks were dropped by the model's rules; outlines in level-0 pixels whatever scale the labels are at
    objects = class_objects(pyramid.levels[0], pyramid.classes, pyramid.slide_downsample)
    geojson = write_geojson(objects, geojson_path, overwrite=True)
    match = None if truth is None else match_objects(objects, truth, slide.level_shapes[0])
    overview = write_overview(slide, objects, overview_path, truth=truth, match=match)
    summary = result.summary
    job = DemoResult(
        slide,
        labels_path,
        geojson,
        overview,
        len(objects),
        summary.describe(),
        summary.warning(),
        result.stats.seconds,
        match,
    )
    if nuclei_segmenter is not None:
        from ..inference.instance_api import segment_instances_slide

        found = segment_instances_slide(
            slide,
            nuclei_segmenter,
            nuclei_path,
            overwrite=True,
            batch_size=getattr(nuclei_segmenter, "tiles_per_call", 1),
            progress=nuclei_progress,
        )
        job.nuclei, job.nuclei_seconds = found.path, found.stats.seconds
        job.nuclei_terms = str(getattr(nuclei_segmenter, "licence", "") or "")
        job.nuclei_summary = found.summary.line() if found.summary is not None else None
    return job


def match_objects(
    found: AnnotationSet, truth: AnnotationSet, shape: tuple[int, int], iou: float = DEMO_IOU
) -> MatchResult:
    """Found objects matched one-to-one to annotated ones at IoU >= `iou`, both drawn block by block.

    Object ids in the result's pairs are positions in each set, from 1. Polygons are
    drawn only where they lie, so a whole slide's worth costs its objects, not its pixels.
    """
    from ..annotations import PolygonLabels
    from ..evaluation.blockwise import PairCounts, block_cells, blocks, parallel_map
    from ..evaluation.instances import match_from_table

    pred, true = PolygonLabels(found, shape), PolygonLabels(truth, shape)

    def cells(box):
        y0, y1, x0, x1 = box
        return block_cells(true.tile(1, y0, x0, y1 - y0, x1 - x0), pred.tile(1, y0, x0, y1 - y0, x1 - x0))

    counts = PairCounts()
    for part in parallel_map(cells, blocks(shape)):
        counts.add_cells(part)
    return match_from_table(counts.table(), iou)


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


def write_overview(
    slide: Slide,
    objects: AnnotationSet,
    path: Path,
    *,
    truth: AnnotationSet | None = None,
    match: MatchResult | None = None,
) -> Path:
    """The slide at most OVERVIEW_SIDE px wide with the objects tinted and outlined.

    Green: found (matched to an annotated glomerulus when `match` is given); yellow:
    found but not annotated; red outline: annotated but missed.
    """
    from scipy import ndimage

    from ..annotations import rasterize
    from ..common.atomic import atomic_output

    height, width = slide.level_shapes[0]
    scale = max(1.0, max(height, width) / OVERVIEW_SIDE)
    size = (max(1, round(height / scale)), max(1, round(width / scale)))
    rgb = read_scaled(slide, (0, 0, size[1] * scale, size[0] * scale), size).astype(np.float32)
    colours = np.tile(GREEN, (len(objects) + 1, 1))
    if match is not None:
        matched = {p for _, p, _ in match.pairs}
        colours[[i for i in range(1, len(objects) + 1) if i not in matched]] = YELLOW
    ids = rasterize(objects, size, downsample=scale)
    mask = ids > 0
    outline = mask & ~ndimage.binary_erosion(mask, iterations=2)
    rgb[mask] = 0.65 * rgb[mask] + 0.35 * colours[ids[mask]]
    rgb[outline] = colours[ids[outline]]
    if truth is not None and match is not None:
        found = {t for t, _, _ in match.pairs}
        missed = AnnotationSet([a for i, a in enumerate(truth, start=1) if i not in found])
        drawn = rasterize(missed, size, downsample=scale) > 0
        rgb[drawn & ~ndimage.binary_erosion(drawn, iterations=3)] = RED
    with atomic_output(path) as tmp:
        Image.fromarray(rgb.astype(np.uint8)).save(tmp, format="PNG")
    return path
