"""Cutting examples: one crop per painted or annotated object, centred on it, at the prompt set's scale.

The crop is read from the slide at the set's mpp (`read_scaled`: the nearest
pyramid level, then resampled), so prompts and the tiles SegGPT later segments
share one scale, whatever the slide's magnification.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from scipy import ndimage

from ..annotations import AnnotationSet
from ..annotations.raster import rasterize
from ..io import Slide
from ..tiling import read_scaled
from .errors import PromptError
from .promptset import Example, PromptSet

MIN_PIXELS = 16  # a painted speck smaller than this (in label pixels) is a slip of the brush, not an example


def _slide_mpp(slide: Slide) -> float:
    if slide.mpp is None:
        raise PromptError(
            f"{slide.source.name}: its pixel size is unknown, so crops cannot be cut at the prompt set's scale: "
            "give the micrometres per pixel (--image-mpp for `nephro prompts add`, --mpp for `nephro segment`, "
            "Slide info in napari)"
        )
    return slide.mpp


def crop_box(slide: Slide, prompts: PromptSet, cx: float, cy: float) -> tuple[float, float, float, float]:
    """The level-0 box (x, y, w, h) of a crop centred on (cx, cy)."""
    side = prompts.size * prompts.mpp / _slide_mpp(slide)
    return (cx - side / 2, cy - side / 2, side, side)


def _too_big(label: str, extent_px: float, slide: Slide, prompts: PromptSet) -> str | None:
    extent = extent_px * _slide_mpp(slide)
    if extent <= prompts.field_um:
        return None
    return (
        f"a {label} object spans {extent:.0f} um, more than a crop ({prompts.field_um:.0f} um at "
        f"{prompts.mpp:g} um/px): skipped; use a prompt set at a coarser mpp for objects this large"
    )


def examples_from_labels(
    slide: Slide,
    labels: np.ndarray,
    prompts: PromptSet,
    *,
    downsample: float = 1.0,
    origin: tuple[float, float] = (0.0, 0.0),
    values: Mapping[int, str] | None = None,
) -> tuple[list[Example], list[str]]:
    """One example per connected painted object of `labels`, and a note for each object left out.

    `labels` lies over the slide: its pixel (r, c) covers the level-0 square of side
    `downsample` at `origin` (x, y) + (c, r) * `downsample`. `values` names the
    classes of its label values (default: value i is `prompts.classes[i - 1]`).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise PromptError(f"paint prompts on a 2D Labels layer, not one of shape {labels.shape}")
    values = dict(values) if values is not None else {i: c for i, c in enumerate(prompts.classes, start=1)}
    present = [int(v) for v in np.unique(labels) if v]
    if not present:
        raise PromptError("nothing is painted: paint a few objects (one label value per class) first")
    unknown = [v for v in present if v not in values]
    if unknown:
        raise PromptError(
            f"label value(s) {', '.join(map(str, unknown))} have no class (the classes are "
            f"{', '.join(f'{k}={v}' for k, v in values.items())}): name them or repaint"
        )
    foreign = sorted({values[v] for v in present} - set(prompts.classes))
    if foreign:
        raise PromptError(
            f"the painting's class(es) {', '.join(foreign)} are not among the prompt set's classes "
            f"({', '.join(prompts.classes)}): add them to the classes"
        )
    lut = np.zeros(max(present) + 1, np.uint8)
    for value in present:
        lut[value] = prompts.class_id(values[value])
    components, _ = ndimage.label(labels > 0)
    ox, oy = origin
    examples, skipped = [], []
    for k, sl in enumerate(ndimage.find_objects(components), start=1):
        piece = components[sl] == k
        if piece.sum() < MIN_PIXELS:
            continue
        found = np.bincount(labels[sl][piece].astype(np.int64))
        label = values[int(found[1:].argmax()) + 1]
        (r0, r1), (c0, c1) = (sl[0].start, sl[0].stop), (sl[1].start, sl[1].stop)
        note = _too_big(label, max(r1 - r0, c1 - c0) * downsample, slide, prompts)
        if note:
            skipped.append(note)
            continue
        box = crop_box(slide, prompts, ox + (c0 + c1) / 2 * downsample, oy + (r0 + r1) / 2 * downsample)
        mask = lut[_sample(labels, box, prompts.size, downsample, origin)]
        examples.append(_example(slide, box, prompts, mask, label))
    return examples, skipped


def _sample(labels: np.ndarray, box, size: int, downsample: float, origin) -> np.ndarray:
    """`labels` at the crop's pixel centres (nearest), 0 outside it."""
    x, y, w, _ = box
    centres = (np.arange(size) + 0.5) * (w / size)
    rows = np.floor((y + centres - origin[1]) / downsample).astype(np.int64)
    cols = np.floor((x + centres - origin[0]) / downsample).astype(np.int64)
    inside_r = (rows >= 0) & (rows < labels.shape[0])
    inside_c = (cols >= 0) & (cols < labels.shape[1])
    out = labels[np.ix_(rows.clip(0, labels.shape[0] - 1), cols.clip(0, labels.shape[1] - 1))].astype(np.int64)
    out[~inside_r, :] = 0
    out[:, ~inside_c] = 0
    return out


def examples_from_annotations(
    slide: Slide,
    annotations: AnnotationSet,
    prompts: PromptSet,
    *,
    around: Iterable[int] | None = None,
) -> tuple[list[Example], list[str]]:
    """One example per annotated object (or per object of `around`, positions in `annotations`), and notes on
    the objects left out.

    The annotations' labels must already be the set's classes (map them first).
    Each crop's mask holds every annotated object inside it, in its own class.
    """
    unknown = sorted({a.label for a in annotations} - set(prompts.classes))
    if unknown:
        raise PromptError(
            f"annotation classes {', '.join(unknown)} are not among the prompt set's classes "
            f"({', '.join(prompts.classes)}): map them with --map LABEL=CLASS (or LABEL=ignore)"
        )
    if not len(annotations):
        raise PromptError("the annotations hold no object to cut an example around")
    drawn = AnnotationSet(list(annotations), classes=prompts.classes)
    examples, skipped = [], []
    for i in range(len(drawn)) if around is None else around:
        ann = drawn[i]
        x0, y0, x1, y1 = ann.bounds
        note = _too_big(ann.label, max(x1 - x0, y1 - y0), slide, prompts)
        if note:
            skipped.append(note)
            continue
        box = crop_box(slide, prompts, (x0 + x1) / 2, (y0 + y1) / 2)
        step = box[2] / prompts.size
        mask = rasterize(drawn, (prompts.size, prompts.size), downsample=step, origin=box[:2], values="class")
        mask = mask.astype(np.uint8)
        if not (mask == prompts.class_id(ann.label)).any():
            skipped.append(f"a {ann.label} object at ({x0:.0f}, {y0:.0f}) is smaller than a crop pixel: skipped")
            continue
        examples.append(_example(slide, box, prompts, mask, ann.label))
    return examples, skipped


def _example(slide: Slide, box, prompts: PromptSet, mask: np.ndarray, label: str) -> Example:
    image = read_scaled(slide, box, (prompts.size, prompts.size))
    return Example(np.ascontiguousarray(image), mask.astype(np.uint8), label, slide.source.name, tuple(box))
