"""Score predictions against ground truth, for one pair of files or two folders matched by stem."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..annotations import AnnotationError, AnnotationSet, rasterize, read_annotations
from ..annotations.coco import read_coco
from ..annotations.io import LABEL_IMAGE_EXTENSIONS, read_label_image
from ..evaluation import match_instances, per_crop, pixel_scores, pixel_scores_per_class, summarize

ANNOTATION_SUFFIXES = (".geojson", ".json", *LABEL_IMAGE_EXTENSIONS)
SUMMARY_KEYS = ("dice", "iou", "precision", "recall", "f1", "mean_matched_iou", "panoptic_quality")


class EvaluationError(Exception):
    """A user mistake in what to compare: one line."""


@dataclass
class Labels:
    instances: np.ndarray  # 0 background, 1..n objects
    classes: np.ndarray | None  # class ids (1-based into names), None when the source has no classes
    names: list[str]


def load_labels(path: Path, shape: tuple[int, int] | None = None, image: str | None = None) -> Labels:
    """Instance (and class) rasters from any annotation file; vector files need `shape`."""
    if path.suffix.lower() in LABEL_IMAGE_EXTENSIONS:
        instances = read_label_image(path)
        return Labels(instances, None, [])
    annotations = read_annotations(path, image=image)
    if shape is None:
        raise EvaluationError(
            f"{path}: polygons need an image size: give --shape HEIGHT,WIDTH or a label image on the other side"
        )
    return _rasterized(annotations, shape)


def _rasterized(annotations: AnnotationSet, shape) -> Labels:
    instances = rasterize(annotations, shape)
    named = [c for c in annotations.classes if c != "unclassified"]
    classes = rasterize(annotations, shape, values="class") if named else None
    return Labels(instances, classes, list(annotations.classes))


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
    pairs = _pairs(pred, truth)
    rows = []
    for name, p_src, t_src in pairs:
        t_labels = _load(t_src, shape)
        p_labels = _load(p_src, t_labels.instances.shape)
        rows.append(evaluate_pair(p_labels, t_labels, iou_threshold=iou_threshold, crops=crops, name=name))
    return {"images": rows, "summary": summarize(rows, SUMMARY_KEYS), "iou_threshold": iou_threshold}


def _load(source, shape) -> Labels:
    if isinstance(source, tuple):  # (COCO file, its image entry): the entry knows the image size
        _, entry = source
        return _rasterized(entry.annotations, (entry.height, entry.width))
    return load_labels(source, shape=shape)


def _pairs(pred: Path, truth: Path) -> list[tuple[str, object, object]]:
    """(name, prediction source, truth source) for every image present on both sides."""
    if pred.is_file() and truth.is_file() and not _is_multi_coco(truth):
        return [(truth.stem, pred, truth)]
    preds = _by_stem(pred)
    truths = _by_stem(truth)
    common = sorted(preds.keys() & truths.keys())
    if not common:
        raise EvaluationError(
            f"no image is on both sides: {len(preds)} predictions, {len(truths)} ground truths, no file stem in common"
        )
    return [(name, preds[name], truths[name]) for name in common]


def _is_multi_coco(path: Path) -> bool:
    if path.suffix.lower() != ".json":
        return False
    try:
        return len(read_coco(path)) > 1
    except AnnotationError:
        return False


def _by_stem(path: Path) -> dict[str, object]:
    if path.is_file():
        if _is_multi_coco(path):
            return {Path(name).stem: (path, entry) for name, entry in read_coco(path).items()}
        return {path.stem: path}
    found = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix.lower() in ANNOTATION_SUFFIXES:
            found[f.stem.removesuffix("_labels").removesuffix("_mask")] = f
    return found
