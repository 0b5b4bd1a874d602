"""Score predictions against ground truth, for one pair of files or two folders matched by stem.

A prediction written at the model's working scale (coarser than the slide) is
scored on the truth's grid: it is upsampled lazily, nearest neighbour, to the
truth's shape (polygons are drawn at the slide's level 0), so its scores are in
the same pixels as those of a full-resolution prediction. Drawing polygons at the
coarse grid instead would be cheaper but would score a different truth.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..annotations import AnnotationSet, PolygonLabels, read_annotations
from ..annotations._json import is_coco, load_json
from ..annotations.coco import coco_from_data
from ..annotations.geojson import geojson_from_data
from ..annotations.io import LABEL_IMAGE_EXTENSIONS, image_stem, read_label_file
from ..annotations.model import UNCLASSIFIED, reading_notes, require_inside
from ..common.paths import path_problem
from ..evaluation import PixelScores, summarize
from ..evaluation.blockwise import ObjectBoxes, PairCounts, block_cells, blocks, parallel_map, read_block
from ..evaluation.instances import match_from_table
from ..evaluation.pixel import per_class_from_histogram
from ..evaluation.summary import DEFAULT_CROP_MARGIN, count_crops, crop_counts, crop_rows
from ..inference.plan import cells as cells_of

ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml", ".zarr", *LABEL_IMAGE_EXTENSIONS)
SUMMARY_KEYS = ("dice", "iou", "precision", "recall", "f1", "mean_matched_iou", "panoptic_quality")


class EvaluationError(Exception):
    """A user mistake in what to compare: one line."""


@dataclass
class Labels:
    """One image's objects, read block by block: instance values and the class of each value.

    `instances` is anything 2-D that slices: a numpy array (label image), a lazy zarr
    / dask array (OME-Zarr), or polygons drawn on demand (`PolygonLabels`), so a
    whole-slide image is never in memory at once.
    """

    instances: Any  # 0 background, 1..n objects
    class_of: np.ndarray | None  # class id (1-based into names) of each instance value; None without classes
    names: list[str]
    notes: list[str] = field(default_factory=list)  # what reading repaired or skipped
    mpp: float | None = None  # micrometres per pixel, when the file says
    downsample: float = 1.0  # slide level-0 pixels per pixel (a segmentation written at the model's scale)
    slide_shape: tuple[int, int] | None = None  # the slide's level-0 shape, when the file records its run

    @property
    def level0_shape(self) -> tuple[int, int]:
        """The slide-sized image these labels cover: polygons on the other side are drawn at this size."""
        return self.slide_shape if self.slide_shape is not None else self.shape

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(n) for n in self.instances.shape)

    def read_instances(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Instance values of pixels [y0:y1, x0:x1]."""
        if isinstance(self.instances, PolygonLabels):
            return self.instances.tile(1, y0, x0, y1 - y0, x1 - x0)
        return read_block(self.instances, y0, y1, x0, x1)

    def classes_of(self, values: np.ndarray) -> np.ndarray:
        """The class id of each instance value (0: background or no class)."""
        values = np.asarray(values, np.int64)
        lut = self.class_of if self.class_of is not None else np.zeros(1, np.uint16)
        known = (values >= 0) & (values < len(lut))
        return np.where(known, lut[np.where(known, values, 0)], 0).astype(np.int64)


def load_labels(path: Path, shape: tuple[int, int] | None = None) -> Labels:
    """Instance (and class) labels from any annotation file; vector files need `shape`."""
    path = Path(path)
    if path.suffix.lower() == ".zarr" or path.suffix.lower() in LABEL_IMAGE_EXTENSIONS:
        raster = read_label_file(path)  # a label image in memory, or OME-Zarr lazily
        labels = _with_classes(raster.labels, raster.classes)
        labels.mpp, labels.downsample, labels.slide_shape = raster.mpp, raster.downsample, raster.slide_shape
        return labels
    return _polygon_labels(read_annotations(path), path, shape)


class Upsampled:
    """A coarse label image seen on a finer grid, lazily: each fine pixel takes the coarse pixel under its
    centre (nearest neighbour, so object ids stay ids). Read block by block like any label array."""

    ndim = 2

    def __init__(self, labels: Labels, shape: tuple[int, int], factor: float) -> None:
        self.labels, self.shape, self.factor = labels, tuple(int(n) for n in shape), float(factor)  # fine px per coarse

    def _sources(self, key: slice, axis: int) -> np.ndarray:
        start, stop, step = key.indices(self.shape[axis])
        fine = np.arange(start, stop, step)
        return np.minimum(((fine + 0.5) / self.factor).astype(np.int64), self.labels.shape[axis] - 1)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = self._sources(key[0], 0), self._sources(key[1], 1)
        if rows.size == 0 or cols.size == 0:
            return np.zeros((rows.size, cols.size), np.uint32)
        block = self.labels.read_instances(int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
        return block[np.ix_(rows - rows[0], cols - cols[0])]


def relative_scale(pred: Labels, truth: Labels) -> float | None:
    """Truth pixels per prediction pixel (4: the prediction is 4x coarser), from what the files record;
    None when nothing says. A run's record (slide shape and output scale) wins over pixel sizes."""
    d_pred = d_truth = None
    if pred.slide_shape is not None:
        d_pred = pred.downsample
        if truth.slide_shape is not None:
            d_truth = truth.downsample if truth.slide_shape == pred.slide_shape else None
        elif truth.shape == pred.slide_shape:
            d_truth = 1.0
    elif truth.slide_shape is not None and pred.shape == truth.slide_shape:
        d_pred, d_truth = 1.0, truth.downsample
    if d_pred is not None and d_truth is not None:
        return d_pred / d_truth
    if pred.mpp and truth.mpp:
        return pred.mpp / truth.mpp
    return None


def align(pred: Labels, truth: Labels, name: str = "") -> tuple[Labels, Labels]:
    """The two sides on one grid: the coarser one (a run written at the model's scale) upsampled to the finer.

    Scores are then counted in the finer side's pixels, as they would be for a
    full-resolution prediction; the coarse side must have exactly the shape its
    scale gives the fine one (`cells`), else the files are not of one image.
    """
    if pred.shape == truth.shape:
        return pred, truth
    factor = relative_scale(pred, truth)
    if factor is not None and factor > 0:
        swap = factor < 1  # the truth is the coarser side
        fine, coarse, f = (pred, truth, 1 / factor) if swap else (truth, pred, factor)
        if covers(fine.shape, f, coarse.shape):
            coarse = replace(coarse, instances=Upsampled(coarse, fine.shape, f))
            return (fine, coarse) if swap else (coarse, fine)
    scale = "" if factor is None else f" at {factor:.4g} truth pixels per prediction pixel"
    hint = (
        " (a coarser prediction needs its scale: an output of nephro segment records it, or both files their pixel size)"
        if factor is None
        else ""
    )
    raise EvaluationError(
        f"{name}: prediction is {pred.shape[1]}x{pred.shape[0]} px{scale}, "
        f"ground truth {truth.shape[1]}x{truth.shape[0]}: they must cover the same image{hint}"
    )


def covers(fine: tuple[int, ...], factor: float, coarse: tuple[int, ...]) -> bool:
    """Whether 2-D `coarse` pixels of `factor` (> 1) fine pixels are exactly what covers 2-D `fine`."""
    return (
        factor > 1
        and len(fine) == len(coarse) == 2
        and all(c == cells_of(f, factor) for f, c in zip(fine, coarse, strict=True))
    )


def _with_classes(instances, classes: dict[int, str]) -> Labels:
    """Instance labels and, when the file names each value's class, the class of each value."""
    named = {v: c for v, c in classes.items() if c != UNCLASSIFIED}
    if not named:
        return Labels(instances, None, [])
    names = list(dict.fromkeys(named.values()))
    lut = np.zeros(max(named) + 1, np.uint16)
    for value, name in named.items():
        lut[value] = names.index(name) + 1
    return Labels(instances, lut, names)


def _polygon_labels(annotations: AnnotationSet, path: Path, shape: tuple[int, int] | None) -> Labels:
    if shape is None:
        raise EvaluationError(
            f"{path}: polygons need an image size: give --shape HEIGHT,WIDTH or a label image on the other side"
        )
    require_inside(annotations, shape, path)
    return _rasterized(annotations, shape, reading_notes(path, annotations.warnings))


def _rasterized(annotations: AnnotationSet, shape, notes: list[str]) -> Labels:
    """Polygons drawn block by block when read; object i has its class id at index i of the lookup table."""
    instances = PolygonLabels(annotations, shape)
    if all(c == UNCLASSIFIED for c in annotations.classes):
        return Labels(instances, None, list(annotations.classes), notes)
    lut = np.array([0, *(annotations.class_id(a.label) for a in annotations)], np.uint16)
    return Labels(instances, lut, list(annotations.classes), notes)


def evaluate_pair(
    pred: Labels, truth: Labels, *, iou_threshold: float = 0.5, crops: bool = False, name: str = ""
) -> dict:
    """Pixel and instance scores of one image, per class when the truth has classes.

    One pass over the image block by block gathers everything (foreground counts,
    object areas and overlaps, class histograms, object boxes); a second pass over
    the blocks that hold crops scores them. Memory: a block and the objects.
    """
    pred, truth = align(pred, truth, name)
    shape = truth.shape
    grid = list(blocks(shape))
    kept = {}  # the one block of a small image, for the crops

    def scan(box):
        t, p = truth.read_instances(*box), pred.read_instances(*box)
        found = None
        if crops:
            found = ObjectBoxes()
            found.add(t, box[0], box[2])
            if len(grid) == 1:
                kept[box] = (p, t)
        return block_cells(t, p), found

    pairs, boxes = PairCounts(), ObjectBoxes()
    for cells, found in parallel_map(scan, grid):
        pairs.add_cells(cells)
        if found is not None:
            boxes.merge(found)
    pixel = PixelScores.from_counts(*pairs.foreground())
    match = match_from_table(pairs.table(), iou_threshold)
    row = {"image": name, "dice": pixel.dice, "iou": pixel.iou, **match.as_dict()}
    if truth.class_of is not None:
        row["per_class"] = {k: v.as_dict() for k, v in _class_scores(pairs, pred, truth).items()}
    if crops:
        counts = crop_counts(boxes.boxes(), DEFAULT_CROP_MARGIN, shape)

        def read(box):
            return kept.get(box) or (pred.read_instances(*box), truth.read_instances(*box))

        count_crops(counts, read, shape)
        row["crops"] = crop_rows(boxes.boxes(), counts)
        crop_dice = [c["dice"] for c in row["crops"] if c["dice"] is not None]
        row["crop_dice_mean"] = float(np.mean(crop_dice)) if crop_dice else None
    return row


def _class_scores(pairs: PairCounts, pred: Labels, truth: Labels) -> dict[str, PixelScores]:
    """Pixel scores per truth class, from the (truth value, prediction value) pixel counts.

    Same class names on both sides: class against class. A class-agnostic prediction
    is scored per class on the pixels that are not another class's truth: finding a
    sclerotic glomerulus is no false positive for the "normal" class.
    """
    t, p, n = pairs.cells()
    t_class = truth.classes_of(t)
    k = len(truth.names) + 1
    if pred.class_of is not None and pred.names == truth.names:
        hist = np.bincount(t_class * k + pred.classes_of(p), weights=n, minlength=k * k)
        return per_class_from_histogram(hist.astype(np.int64), truth.names)
    # per pixel: (truth class, truth object?, prediction object?)
    h = np.bincount((t_class * 2 + (t != 0)) * 2 + (p != 0), weights=n, minlength=k * 4).astype(np.int64)
    h = h.reshape(k, 2, 2)
    out = {}
    for i, name in enumerate(truth.names, start=1):
        tp, fn = h[i, 1, 1], h[i, 1, 0]
        fp = h[i, 0, 1] + h[0, :, 1].sum()  # predicted where the truth is this class's background, or nothing
        if tp + fn == 0:  # a class this image lacks: a prediction without classes cannot be wrong about it
            out[name] = PixelScores(0, int(fp), 0, None, None)
        else:
            out[name] = PixelScores.from_counts(tp, fp, fn)
    return out


def evaluate(
    pred: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    *,
    iou_threshold: float = 0.5,
    crops: bool = False,
    shape: tuple[int, int] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> dict:
    """Compare two files, or two folders (or a folder and a COCO file) matched by file stem.

    What reading the files repaired or skipped (a feature without geometry, a polygon
    made valid) is listed under "notes" and passed, line by line, to `on_note`.
    """
    pred, truth = Path(pred), Path(truth)
    for p in (pred, truth):
        if problem := path_problem(p):
            raise EvaluationError(f"{p}: {problem}")
    preds, truths = _sources(pred), _sources(truth)
    if _single(pred) and _single(truth) and len(preds) == len(truths) == 1:
        pairs = [(truth.stem, next(iter(preds.values())), next(iter(truths.values())))]
    else:
        common = sorted(preds.keys() & truths.keys())
        if not common:
            raise EvaluationError(
                f"no image is on both sides: {len(preds)} predictions, {len(truths)} ground truths, "
                "no file stem in common"
            )
        pairs = [(name, preds[name], truths[name]) for name in common]
    rows, notes = [], []
    for name, p_source, t_source in pairs:
        if shape is None and not t_source.sized and p_source.sized:  # polygons take the size of the label image
            p_labels = p_source.load(None)
            t_labels = t_source.load(p_labels.level0_shape)  # level-0 pixels: the slide's size, at any output scale
        else:
            t_labels = t_source.load(shape)
            p_labels = p_source.load(t_labels.level0_shape)
        for note in (*p_labels.notes, *t_labels.notes):
            if note not in notes:
                notes.append(note)
                if on_note is not None:
                    on_note(note)
        rows.append(evaluate_pair(p_labels, t_labels, iou_threshold=iou_threshold, crops=crops, name=name))
    return {
        "images": rows,
        "summary": summarize(rows, SUMMARY_KEYS),
        "iou_threshold": iou_threshold,
        "notes": notes,
    }


def _single(path: Path) -> bool:
    return path.is_file() or path.suffix.lower() == ".zarr"


@dataclass
class Source:
    """How to get one image's labels: `load(shape)`; `sized` when the file knows the image size itself."""

    load: Callable[[tuple[int, int] | None], Labels]
    sized: bool
    file: Path


def _sources(path: Path) -> dict[str, Source]:
    """Image name -> its labels' source, reading each file once (a COCO file holds many images)."""
    files = [path] if _single(path) else sorted(f for f in path.iterdir() if _single(f))
    found: dict[str, Source] = {}

    def add(name: str, source: Source) -> None:
        """A file named as labels (`x_labels.tif`) wins over one named as the image (`x.png`, the picture)."""
        if name in found:
            old_named, new_named = _named_as_labels(found[name].file), _named_as_labels(source.file)
            if old_named == new_named:
                raise EvaluationError(
                    f"{found[name].file.name} and {source.file.name} are both for image {name!r}: keep one of them"
                )
            if old_named:
                return
        found[name] = source

    for f in files:
        if f.suffix.lower() not in ANNOTATION_SUFFIXES:
            continue
        if f.suffix.lower() == ".json":
            data = load_json(f)
            if is_coco(data):
                for name, entry in coco_from_data(data, f).items():
                    add(Path(name).stem, Source(partial(_coco_labels, entry, f), True, f))
            else:
                add(image_stem(f.stem), Source(partial(_polygon_labels, geojson_from_data(data, f), f), False, f))
            continue
        sized = f.suffix.lower() == ".zarr" or f.suffix.lower() in LABEL_IMAGE_EXTENSIONS
        add(image_stem(f.stem), Source(partial(load_labels, f), sized, f))
    return found


def _named_as_labels(path: Path) -> bool:
    stem = path.name.removesuffix(".zarr") if path.suffix.lower() == ".zarr" else path.stem
    return image_stem(stem) != stem


def _coco_labels(entry, file: Path, _shape) -> Labels:
    """A COCO image knows its own size."""
    require_inside(entry.annotations, (entry.height, entry.width), entry.file_name)
    notes = reading_notes(f"{file} ({entry.file_name})", entry.annotations.warnings)
    return _rasterized(entry.annotations, (entry.height, entry.width), notes)
