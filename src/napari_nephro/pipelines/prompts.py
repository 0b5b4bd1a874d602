"""Build or extend a prompt set folder from annotation files (COCO, GeoJSON, XML, label images) and their images."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import open_slide
from ..prompts import SEGGPT_INPUT, Example, PromptError, PromptSet, examples_from_annotations
from ..prompts.promptset import INDEX
from ..training.data import IGNORE, map_classes
from ..training.errors import TrainingError
from .export import load_items


@dataclass
class Added:
    prompts: PromptSet
    added: list[Example]
    skipped: list[str]  # why objects were left out
    folder: Path


def open_or_new(
    folder: str | os.PathLike[str], *, classes: list[str] | None, mpp: float | None, size: int | None
) -> PromptSet:
    """The set in `folder`, checked against what is asked, or a new one (classes required)."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        prompts = PromptSet.load(folder)
        if mpp is not None and abs(mpp - prompts.mpp) > 1e-9:
            raise PromptError(
                f"{folder} is cut at {prompts.mpp:g} um/px and every example must be at the same scale "
                f"as the tiles SegGPT will see: drop --mpp {mpp:g} (or start a new prompt set)"
            )
        if size is not None and size != prompts.size:
            raise PromptError(f"{folder} holds {prompts.size} px crops: drop --size {size} (or start a new set)")
        for name in classes or ():
            if name not in prompts.classes:
                prompts.classes.append(name)
        return prompts
    if folder.exists():
        raise PromptError(f"{folder}: exists and is not a prompt set (no {INDEX}); choose a new folder")
    if not classes:
        raise PromptError("a new prompt set needs its classes: --classes 'normal,segmental sclerosis,global sclerosis'")
    return PromptSet(list(classes), 1.0 if mpp is None else mpp, SEGGPT_INPUT if size is None else size)


def add_from_files(
    folder: str | os.PathLike[str],
    annotations: str | os.PathLike[str],
    images: str | os.PathLike[str],
    *,
    classes: list[str] | None = None,
    class_map: Mapping[str, str] | None = None,
    mpp: float | None = None,
    size: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    image_mpp: float | None = None,
) -> Added:
    """Cut examples around annotated objects (`per_class` of each class, drawn at random with `seed`) and save.

    The folder is rewritten whole (atomically) only when everything was cut.
    """
    if per_class is not None and per_class < 1:
        raise PromptError("--per-class must be at least 1")
    folder = Path(folder)
    items = [i for i in load_items(annotations, slide=images)]
    missing = [i.name for i in items if i.image is None]
    if missing:
        raise PromptError(f"no image found for {', '.join(missing[:3])}: give --images with files named by stem")
    if classes is None and not (folder / INDEX).is_file():
        labels = [a.label for i in items for a in i.vectors()]
        mapped_labels = [dict(class_map or {}).get(label, label) for label in labels]
        classes = list(dict.fromkeys(c for c in mapped_labels if c != IGNORE))
    prompts = open_or_new(folder, classes=classes, mpp=mpp, size=size)
    try:
        mapped = map_classes(items, prompts.classes, class_map)
    except TrainingError as exc:
        raise PromptError(str(exc).replace("model's classes", "prompt set's classes")) from None
    chosen = _choose(items, mapped, prompts.classes, per_class, seed)
    if not any(chosen.values()):
        raise PromptError(f"{annotations}: no object of the classes {', '.join(prompts.classes)}")
    added, skipped = [], []
    for item in items:
        if not chosen.get(item.name):
            continue
        with open_slide(item.image) as slide:
            if slide.mpp is None and (item.mpp or image_mpp):  # the file's own pixel size comes first
                slide.set_mpp(item.mpp or image_mpp)
            examples, notes = examples_from_annotations(slide, mapped[item.name], prompts, around=chosen[item.name])
        skipped += notes
        for example in examples:
            if prompts.add(example) is not None:
                added.append(example)
    prompts.save(folder, overwrite=True)
    return Added(prompts, added, skipped, folder)


def _choose(items, mapped, classes, per_class, seed) -> dict[str, list[int]]:
    """Positions of the objects to cut around, per item: all of them, or `per_class` of each class overall."""
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[int]] = {i.name: [] for i in items}
    for name in classes:
        members = [(item.name, k) for item in items for k, a in enumerate(mapped[item.name]) if a.label == name]
        if per_class is not None and len(members) > per_class:
            members = [members[j] for j in sorted(rng.choice(len(members), per_class, replace=False))]
        for item_name, k in members:
            chosen[item_name].append(k)
    return chosen
