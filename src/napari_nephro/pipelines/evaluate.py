"""Score predictions against ground truth, for one pair of files or two folders matched by stem."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..annotations import AnnotationSet, rasterize, read_annotations
from ..annotations._json import is_coco, load_json
from ..annotations.coco import coco_from_data
from ..annotations.geojson import geojson_from_data
from ..annotations.io import LABEL_IMAGE_EXTENSIONS, image_stem, read_label_file
from ..annotations.model import UNCLASSIFIED, require_inside
from ..evaluation import match_instances, per_crop, pixel_scores, pixel_scores_per_class, summarize

ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml", ".zarr", *LABEL_IMAGE_EXTENSIONS)
SUMMARY_KEYS = ("dice", "iou", "precision", "recall", "f1", "mean_matched_iou", "panoptic_quality")


class EvaluationError(Exception):
    """A user mistake in what to compare: one line."""


@dataclass
class Labels:
    instances: np.ndarray  # 0 background, 1..n objects
    classes: np.ndarray | None  # class ids (1-based into names), None when the source has no classes
    names: list[str]


def load_labels(path: Path, shape: tuple[int, int] | None = None) -> Labels:
    """Instance (and class) rasters from any annotation file; vector files need `shape`."""
    if path.suffix.lower() == ".zarr" or path.suffix.lower() in LABEL_IMAGE_EXTENSIONS:
        raster = read_label_file(path)
        return _with_classes(np.asarray(raster.labels).astype(np.uint32, copy=False), raster.classes)
    return _polygon_labels(read_annotations(path), path, shape)


def _with_classes(instances: np.ndarray, classes: dict[int, str]) -> Labels:
    """Instance labels and, when the file names each value's class, the class raster."""
    named = {v: c for v, c in classes.items() if c != UNCLASSIFIED}
    if not named:
        return Labels(instances, None, [])
    names = list(dict.fromkeys(named.values()))
    lut = np.zeros(max(int(instances.max()), max(named)) + 1, np.uint16)
    for value, name in named.items():
        lut[value] = names.index(name) + 1
    return Labels(instances, lut[instances], names)


def _polygon_labels(annotations: AnnotationSet, path: Path, shape: tuple[int, int] | None) -> Labels:
    if shape is None:
        raise EvaluationError(
            f"{path}: polygons need an image size: give --shape HEIGHT,WIDTH or a label image on the other side"
        )
    require_inside(annotations, shape, path)
    return _rasterized(annotations, shape)


def _rasterized(annotations: AnnotationSet, shape) -> Labels:
    """Instances drawn once; the class raster follows from them (object i has its class id at index i)."""
    instances = rasterize(annotations, shape)
    if all(c == UNCLASSIFIED for c in annotations.classes):
        return Labels(instances, None, list(annotations.classes))
    lut = np.array([0, *(annotations.class_id(a.label) for a in annotations)], np.uint16)
    return Labels(instances, lut[instances], list(annotations.classes))


def evaluate_pair(
    pred: Labels, truth: Labels, *, iou_threshold: float = 0.5, crops: bool = False, name: str = ""
) -> dict:
    """Pixel and instance scores of one image, per class when the truth has classes."""
    if pred.instances.shape != truth.instances.shape:
        raise EvaluationError(
            f"{name}: prediction is {pred.instances.shape[1]}x{pred.instances.shape[0]} px, "
            f"ground truth {truth.instances.shape[1]}x{truth.instances.shape[0]}: they must cover the same image"
        )
    pixel = pixel_scores(pred.instances, truth.instances)
    match = match_instances(pred.instances, truth.instances, iou_threshold)
    row = {"image": name, "dice": pixel.dice, "iou": pixel.iou, **match.as_dict()}
    if truth.classes is not None and pred.classes is not None and pred.names == truth.names:
        per_class = pixel_scores_per_class(pred.classes, truth.classes, truth.names)
        row["per_class"] = {k: v.as_dict() for k, v in per_class.items()}
    elif truth.classes is not None:
        # A class-agnostic prediction is scored per class on the pixels that are not
        # another class's truth: finding a sclerotic glomerulus is no false positive
        # for the "normal" class.
        row["per_class"] = {}
        for i, c in enumerate(truth.names, start=1):
            other = (truth.classes != i) & (truth.classes != 0)
            scores = pixel_scores(np.where(other, 0, pred.instances), np.where(truth.classes == i, truth.instances, 0))
            row["per_class"][c] = scores.as_dict()
    if crops:
        row["crops"] = per_crop(pred.instances, truth.instances)
        crop_dice = [c["dice"] for c in row["crops"] if c["dice"] is not None]
        row["crop_dice_mean"] = float(np.mean(crop_dice)) if crop_dice else None
    return row


def evaluate(
    pred: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    *,
    iou_threshold: float = 0.5,
    crops: bool = False,
    shape: tuple[int, int] | None = None,
) -> dict:
    """Compare two files, or two folders (or a folder and a COCO file) matched by file stem."""
    pred, truth = Path(pred), Path(truth)
    for p in (pred, truth):
        if not p.exists():
            raise EvaluationError(f"{p}: no such file or directory")
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
    rows = []
    for name, p_source, t_source in pairs:
        if shape is None and not t_source.sized and p_source.sized:  # polygons take the size of the label image
            p_labels = p_source.load(None)
            t_labels = t_source.load(p_labels.instances.shape)
        else:
            t_labels = t_source.load(shape)
            p_labels = p_source.load(t_labels.instances.shape)
        rows.append(evaluate_pair(p_labels, t_labels, iou_threshold=iou_threshold, crops=crops, name=name))
    return {"images": rows, "summary": summarize(rows, SUMMARY_KEYS), "iou_threshold": iou_threshold}


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
                    add(Path(name).stem, Source(partial(_coco_labels, entry), True, f))
            else:
                add(image_stem(f.stem), Source(partial(_polygon_labels, geojson_from_data(data, f), f), False, f))
            continue
        sized = f.suffix.lower() == ".zarr" or f.suffix.lower() in LABEL_IMAGE_EXTENSIONS
        add(image_stem(f.stem), Source(partial(load_labels, f), sized, f))
    return found


def _named_as_labels(path: Path) -> bool:
    stem = path.name.removesuffix(".zarr") if path.suffix.lower() == ".zarr" else path.stem
    return image_stem(stem) != stem


def _coco_labels(entry, _shape) -> Labels:
    """A COCO image knows its own size."""
    require_inside(entry.annotations, (entry.height, entry.width), entry.file_name)
    return _rasterized(entry.annotations, (entry.height, entry.width))
