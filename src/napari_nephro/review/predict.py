"""Every model of a review project on every patch, through the real engine, resumably.

A model sees the slide, not the patch PNG: the engine reads its tiles at the
model's own scale with real context around the patch, exactly as a whole-slide
run would, and gives its objects back at the patch's pixels (`out_downsample` =
project mpp / slide mpp). Nuclei come from `segment_instances_region`; glomeruli
from `segment_region` (the model's object rules applied), made instances by
connected components per class.

Each prediction is written whole (label TIFF, then its classes JSON, then its
predictions.csv row, each atomic or fsynced), so a run killed or cancelled at
any point leaves only finished predictions; the next run skips every (patch,
model) that has its row and its file. A model whose weights changed since its
first predictions is refused rather than mixed in.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..common.atomic import atomic_output
from ..inference.errors import SegmentError
from ..io import Slide, SlideError, open_slide
from ..models.errors import ModelError
from .layout import (
    PREDICTION_FIELDS,
    PREDICTIONS_CSV,
    ModelEntry,
    Patch,
    Project,
    ReviewError,
    append_row,
    prediction_classes,
    prediction_tif,
    read_patches,
    read_project,
    read_rows,
    write_labels,
    write_project,
)

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]


# --- models --------------------------------------------------------------------------------------------------


def task_of(spec: str) -> str:
    """'nuclei' for a nuclei model (cellpose, stardist, cellvit, nuclei[:FOLDER]), else 'glomeruli' (a checkpoint
    folder of ours, or the shipped `default`)."""
    from ..models.nuclei import family_of

    return "nuclei" if family_of(spec) is not None else "glomeruli"


def load_segmenter(spec: str, task: str, *, device: str = "auto", name: str | None = None):
    """The segmenter `spec` names, for a project of `task`; a model that does not load is a one-line ReviewError."""
    label = f"model {name}" if name else f"model {spec}"
    if task_of(spec) != task:
        kind = "a nuclei" if task == "glomeruli" else "a glomerulus"
        raise ReviewError(f"{label} ({spec}) is {kind} model: this is a {task} project; a project rates one kind")
    try:
        with warnings.catch_warnings():  # a licence note is recorded in project.json and told by the caller
            warnings.simplefilter("ignore", UserWarning)
            if task == "nuclei":
                from ..models.nuclei import load_nuclei_model

                return load_nuclei_model(spec, device=device)
            from ..models.segmenter import TorchSegmenter

            return TorchSegmenter.from_checkpoint(spec, device=device)
    except (ModelError, OSError) as exc:
        raise ReviewError(f"{label}: {exc}") from None


def fingerprint_of(segmenter, spec: str) -> str:
    """What identifies the weights and settings: the segmenter's own fingerprint, else the checkpoint's bytes."""
    found = str(getattr(segmenter, "fingerprint", "") or "")
    if found:
        return found
    from ..models.segmenter import checkpoint_fingerprint

    return checkpoint_fingerprint(spec)


def model_entry(name: str, spec: str, segmenter, task: str) -> ModelEntry:
    """project.json's record of a loaded model: which weights and settings, at which scale, under which terms."""
    config = getattr(segmenter, "config", None)
    if task == "nuclei":
        from ..models.nuclei import family_of

        family = family_of(spec) or ""
    else:
        family = str(getattr(config, "arch", "") or "")
    licence = str(getattr(segmenter, "licence", "") or "")
    if not licence and config is not None:
        licence = str(getattr(config, "provenance", {}).get("licence", "") or "")
    return ModelEntry(name, spec, family, fingerprint_of(segmenter, spec), float(segmenter.mpp), licence)


def close(segmenters: Iterable) -> None:
    """Release what a segmenter holds besides memory (StarDist's worker process)."""
    for segmenter in segmenters:
        closer = getattr(segmenter, "close", None)
        if closer is not None:
            closer()


# --- one prediction ------------------------------------------------------------------------------------------


def predict_patch(
    slide: Slide, segmenter, patch: Patch, project: Project, cancel: CancelFn | None = None
) -> tuple[np.ndarray, dict[int, str] | None] | None:
    """One model's objects on one patch: (uint32 ids at the patch PNG's pixels, id -> class name or None for
    a one-class model); None when cancelled midway."""
    from ..inference.plan import slide_mpp

    downsample = project.mpp / slide_mpp(slide)
    region = (patch.x, patch.y, patch.width, patch.height)
    if getattr(segmenter, "kind", None) == "instance":
        from ..inference.instance_api import segment_instances_region

        result = segment_instances_region(
            slide,
            segmenter,
            region,
            out_downsample=downsample,
            batch_size=getattr(segmenter, "tiles_per_call", None) or 4,
            skip_background=False,  # the rater judges the model, not the glass test: every tile goes to it
            cancel=cancel,
        )
        if not result.stats.complete:
            return None
        labels = fit(result.array, project.size)
        classes = list(segmenter.classes)
        names = None
        if len(classes) > 1:
            present = set(np.unique(labels).tolist()) - {0}
            names = {n.id: _class_name(classes, n.cls) for n in result.nuclei if n.id in present}
        return labels, names
    from ..inference.api import segment_region

    result = segment_region(slide, segmenter, region, out_downsample=downsample, skip_background=False, cancel=cancel)
    if not result.stats.complete:
        return None
    labels, names = instances_of(fit(result.array, project.size), result.classes)
    return labels, names if len(result.classes) > 1 else None


def _class_name(classes: list[str], cls: int) -> str:
    return classes[cls] if 0 <= cls < len(classes) else str(cls)


def fit(array: np.ndarray, size: int) -> np.ndarray:
    """`array` cropped or zero-padded to (size, size): the engine's output grid covers whole level-0 pixels, so it
    may be a pixel larger (or, by rounding, smaller) than the patch."""
    out = np.zeros((size, size), array.dtype)
    h, w = min(size, array.shape[0]), min(size, array.shape[1])
    out[:h, :w] = array[:h, :w]
    return out


def instances_of(class_map: np.ndarray, classes: dict[int, str]) -> tuple[np.ndarray, dict[int, str]]:
    """A class map made objects: each 8-connected region of one class gets its own id (1, 2, ... class by class)."""
    labels = np.zeros(class_map.shape, np.uint32)
    names: dict[int, str] = {}
    structure = np.ones((3, 3), bool)
    next_id = 1
    for value in sorted(v for v in np.unique(class_map).tolist() if v):
        found, count = ndimage.label(class_map == value, structure=structure)
        if not count:
            continue
        inside = found > 0
        labels[inside] = found[inside].astype(np.uint32) + (next_id - 1)
        for i in range(next_id, next_id + count):
            names[i] = classes.get(value, str(value))
        next_id += count
    return labels, names


def objects_in(labels: np.ndarray) -> int:
    return int(np.count_nonzero(np.unique(labels)))


# --- a project's predictions ---------------------------------------------------------------------------------


def done_predictions(root: str | os.PathLike[str]) -> set[tuple[str, str]]:
    """(patch, model) pairs that have their predictions.csv row and their label file: finished, never redone."""
    root = Path(root)
    return {
        (r["patch"], r["model"])
        for r in read_rows(root / PREDICTIONS_CSV, PREDICTION_FIELDS)
        if prediction_tif(root, r["model"], r["patch"]).is_file()
    }


def open_slides(project: Project, ids: set[str]) -> dict[str, Slide]:
    """The project's slides named in `ids`, at the pixel size recorded for them; one that is gone is a ReviewError."""
    slides: dict[str, Slide] = {}
    try:
        for entry in project.slides:
            if entry.id in ids:
                try:
                    slides[entry.id] = open_slide(entry.path, mpp=entry.mpp)
                except SlideError as exc:
                    raise ReviewError(
                        f"slide {entry.id} does not open ({exc}): put it back at {entry.path} to predict its patches"
                    ) from None
    except BaseException:
        for slide in slides.values():
            slide.close()
        raise
    missing = sorted(ids - set(slides))
    if missing:
        raise ReviewError(f"patches.csv names slides project.json lacks: {', '.join(missing)}")
    return slides


def run_predictions(
    root: str | os.PathLike[str],
    *,
    models: list[str] | None = None,
    loaded: dict | None = None,
    device: str = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> int:
    """Make every missing prediction of the project (or of the named `models`); the number made.

    `loaded`: segmenters already loaded, by model name (the others are loaded here
    and closed after). Patch by patch, every model on one patch before the next,
    so a project half done can already be rated from its first patches.
    progress(done, total, text) counts (patch, model) pairs, those made before
    included; cancel() is asked before each prediction and inside it, and a
    cancelled run keeps what it finished. Raises ReviewError when a model's
    weights (its fingerprint) differ from those that made its first predictions.
    """
    root = Path(root)
    project = read_project(root)
    patches = read_patches(root)
    names = project.model_names if models is None else models
    entries = [project.model(n) for n in names]
    done = done_predictions(root)
    todo = [(p, e) for p in patches for e in entries if (p.patch, e.name) not in done]
    total = len(patches) * len(entries)
    finished = total - len(todo)
    if progress is not None:
        progress(finished, total, "")
    if not todo:
        return 0
    loaded = dict(loaded or {})
    mine = []  # loaded here: closed here
    slides: dict[str, Slide] = {}
    made = 0
    try:
        changed = False
        for entry in {e.name: e for _, e in todo}.values():
            if entry.name not in loaded:
                loaded[entry.name] = load_segmenter(entry.spec, project.task, device=device, name=entry.name)
                mine.append(loaded[entry.name])
            changed |= _check_weights(root, entry, loaded[entry.name], done)
        if changed:
            write_project(root, project)
        slides = open_slides(project, {p.slide for p, _ in todo})
        for patch, entry in todo:
            if cancel is not None and cancel():
                break
            start = time.perf_counter()
            try:
                result = predict_patch(slides[patch.slide], loaded[entry.name], patch, project, cancel)
            except SegmentError as exc:
                raise ReviewError(f"model {entry.name} on patch {patch.patch}: {exc}") from None
            if result is None:
                break
            labels, names_of = result
            _write_prediction(root, entry.name, patch.patch, labels, names_of, time.perf_counter() - start)
            made += 1
            if progress is not None:
                progress(finished + made, total, f"{entry.name} on {patch.patch}")
    finally:
        close(mine)
        for slide in slides.values():
            slide.close()
    return made


def _check_weights(root: Path, entry: ModelEntry, segmenter, done: set[tuple[str, str]]) -> bool:
    """Refuse other weights than those that made the model's predictions; True when the entry was updated
    (it had none yet, so nothing is mixed)."""
    found = fingerprint_of(segmenter, entry.spec)
    if found == entry.fingerprint:
        return False
    if entry.fingerprint and any(model == entry.name for _, model in done):
        raise ReviewError(
            f"model {entry.name}'s weights changed since its predictions were made ({entry.spec}: "
            f"{entry.fingerprint} then, {found} now): use a new model name, or --overwrite"
        )
    entry.fingerprint = found
    entry.mpp = float(segmenter.mpp)
    return True


def _write_prediction(
    root: Path, model: str, patch: str, labels: np.ndarray, names: dict[int, str] | None, seconds: float
) -> None:
    """Label TIFF, classes JSON, then the row that marks it finished: a kill between them only costs a redo."""
    write_labels(prediction_tif(root, model, patch), labels)
    classes = prediction_classes(root, model, patch)
    if names is not None:
        with atomic_output(classes) as tmp:
            tmp.write_text(json.dumps({str(k): v for k, v in sorted(names.items())}, indent=1) + "\n")
    elif classes.exists():
        classes.unlink()  # from a model of the same name with classes, replaced since
    seconds = seconds if math.isfinite(seconds) else 0.0
    append_row(
        root / PREDICTIONS_CSV,
        PREDICTION_FIELDS,
        {"patch": patch, "model": model, "objects": objects_in(labels), "seconds": round(seconds, 3)},
    )
