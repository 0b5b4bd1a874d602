"""A review project's easy and hard pairs as a training set, in the tile-dataset format of `nephro export`.

    OUT/images/<patch>.png    the patch (RGB, at the project's mpp)
    OUT/masks/<patch>.png     nuclei: instance ids 1..n (uint16 PNG); glomeruli: class values (uint8 PNG),
                              from the prediction's classes JSON when there is one, else 1
    OUT/tiles.csv             the tile-dataset columns (image, mask, source, x, y, size_level0, tissue,
                              foreground, values) plus patch, set (easy / hard), model (the easy pair's
                              model, or "corrected") and weight (the class-wise oversampling weight)
    OUT/dataset.json          tiles, tile_size, mpp, mask_values, classes, and "review": where it came from

Easy pairs are good predictions taken as labels (`sets.easy_pairs`, one per
patch); hard pairs are corrected patches (`sets.save_correction`). A patch that
was corrected is exported once, as hard, even if a model was good on it: a
person's correction is the better label. Medium patches are in neither set;
fused-bad patches not corrected yet are left out and counted.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..common.atomic import atomic_output
from ..tiling import tissue_fraction
from . import layout
from .consensus import effective_ratings
from .oversampling import GAMMA, oversampling_weights
from .sets import corrected, correction_classes, easy_pairs, hard_patches, relabel

log = logging.getLogger(__name__)

SETS = ("easy", "hard")
CORRECTED = "corrected"  # the model column of a hard pair
TILE_FIELDS = ("image", "mask", "source", "x", "y", "size_level0", "tissue", "foreground", "values")
FIELDS = (*TILE_FIELDS, "patch", "set", "model", "weight")
DEFAULT_CLASS = "glomerulus"  # glomerulus objects without a classes JSON
PNG_LEVEL = 1


def export_tiles(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    sets: tuple[str, ...] | list[str] = SETS,
    gamma: float = GAMMA,
    rule: str = "agreement",
    order: list[str] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Path:
    """Write the easy and / or hard pairs of project `root` as a tile dataset in `out` (whole or not at all).

    `gamma` sets the oversampling weights of the rows' sets (`oversampling_weights`);
    `rule` and `order` choose each easy pair's model (`sets.easy_pairs`). How many
    fused-bad patches still wait for a correction goes to `on_note` (and the log)
    and into dataset.json.
    """
    root, out = Path(root), Path(out)
    sets = tuple(dict.fromkeys(sets))
    wrong = [s for s in sets if s not in SETS]
    if not sets or wrong:
        raise layout.ReviewError(f"sets must be among {', '.join(SETS)}, not {', '.join(wrong) or 'none'}")
    oversampling_weights([], gamma)  # checks gamma before any work
    if out.exists() and not overwrite:
        raise layout.ReviewError(f"{out}: already exists; pass --overwrite to replace it")
    if _inside_project(root, out):
        raise layout.ReviewError(f"{out}: would replace part of the project; export to another folder")
    project = layout.read_project(root)
    patches = {p.patch: p for p in layout.read_patches(root)}
    ratings = effective_ratings(root)
    done = corrected(root) & set(patches)
    waiting = [p for p in hard_patches(root, ratings) if p not in done]
    plan: dict[str, tuple[str, str]] = {}  # patch -> (set, model)
    if "easy" in sets:
        for pair in easy_pairs(root, ratings, rule=rule, order=order):
            plan[pair.patch] = ("easy", pair.model)
    if "hard" in sets:
        for patch in done:
            plan[patch] = ("hard", CORRECTED)
    plan = {p: plan[p] for p in patches if p in plan}  # patch order
    if "hard" in sets and waiting:
        note = f"{len(waiting)} fused-bad patch(es) not corrected yet are left out (e.g. {waiting[0]})"
        log.warning(note)
        if on_note is not None:
            on_note(note)
    if not plan:
        raise layout.ReviewError(_nothing(sets, len(waiting)))
    pairs = [_Pair(root, patches[p], kind, model, project) for p, (kind, model) in plan.items()]
    classes = _classes(pairs) if project.task == "glomeruli" else []
    weights = oversampling_weights([p.kind for p in pairs], gamma)
    slides = {s.id: s for s in project.slides}
    with atomic_output(out) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        rows = []
        for k, (pair, weight) in enumerate(zip(pairs, weights, strict=True), start=1):
            rows.append(pair.write(tmp, classes, slides, float(weight)))
            if progress is not None:
                progress(k, len(pairs))
        counts = {s: sum(p.kind == s for p in pairs) for s in sets}
        review = {
            "project": str(root),
            "sets": counts,
            "gamma": gamma,
            "rule": rule,
            "order": list(order) if order else None,
            "raters": layout.raters(root),
            "uncorrected": len(waiting),
            "task": project.task,
            "models": {
                m.name: {"spec": m.spec, "family": m.family, "fingerprint": m.fingerprint} for m in project.models
            },
        }
        _write_index(tmp, rows, project, classes, review, slides)
    return out


PROJECT_PARTS = (
    "patches",
    "predictions",
    "ratings",
    "corrections",
    "results",
    layout.PROJECT_FILE,
    layout.PATCHES_CSV,
    layout.PREDICTIONS_CSV,
    layout.CORRECTIONS_CSV,
)


def _inside_project(root: Path, out: Path) -> bool:
    """Whether writing `out` would replace the project or one of its parts (a folder such as PROJECT/exports is fine)."""
    root, out = root.resolve(), out.resolve()
    if out == root or out in root.parents:
        return True
    return root in out.parents and out.relative_to(root).parts[0] in PROJECT_PARTS


def _nothing(sets: tuple[str, ...], waiting: int) -> str:
    parts = []
    if "easy" in sets:
        parts.append("no patch has a good prediction (rate the predictions first)")
    if "hard" in sets:
        parts.append(f"no patch is corrected ({waiting} fused-bad wait for a correction in the Review widget)")
    return "nothing to export: " + "; ".join(parts)


class _Pair:
    """One exported patch: its image, the labels it gets and where they come from."""

    def __init__(self, root: Path, patch: layout.Patch, kind: str, model: str, project: layout.Project) -> None:
        self.root, self.patch, self.kind, self.model, self.task = root, patch, kind, model, project.task
        name = patch.patch
        if kind == "hard":
            self.labels_path, self.classes_path = layout.correction_tif(root, name), correction_classes(root, name)
        else:
            self.labels_path = layout.prediction_tif(root, model, name)
            self.classes_path = layout.prediction_classes(root, model, name)
        self.image_path = layout.patch_png(root, name)
        for path in (self.image_path, self.labels_path):
            if not path.is_file():
                raise layout.ReviewError(f"{name}: {path} is missing; run nephro review predict to finish the project")

    @functools.cached_property
    def object_classes(self) -> dict[int, str]:
        """Id -> class name of a glomerulus pair (read once: the class list and the mask both need it)."""
        return layout.read_classes(self.classes_path) if self.task == "glomeruli" else {}

    def write(self, folder: Path, classes: list[str], slides: dict, weight: float) -> dict:
        name = self.patch.patch
        with Image.open(self.image_path) as opened:
            image = np.asarray(opened.convert("RGB"))
        labels = layout.read_labels(self.labels_path)
        if labels.shape != image.shape[:2]:
            raise layout.ReviewError(
                f"{name}: {self.labels_path.name} is {labels.shape[1]}x{labels.shape[0]} px but the patch is "
                f"{image.shape[1]}x{image.shape[0]}; predict or correct it again"
            )
        if self.task == "glomeruli":
            mask = _class_mask(labels, self.object_classes, classes).astype(np.uint8)
        else:
            mask, ids = relabel(labels)
            if len(ids) > 65535:
                raise layout.ReviewError(f"{name}: more than 65535 objects do not fit a PNG mask")
            mask = mask.astype(np.uint16)
        shutil.copyfile(self.image_path, folder / "images" / f"{name}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{name}.png", compress_level=PNG_LEVEL)
        slide = slides.get(self.patch.slide)
        values = np.unique(mask)
        return {
            "image": f"images/{name}.png",
            "mask": f"masks/{name}.png",
            "source": Path(slide.path).name if slide is not None else self.patch.slide,
            "x": round(self.patch.x, 2),
            "y": round(self.patch.y, 2),
            "size_level0": round(self.patch.width, 2),
            "tissue": round(tissue_fraction(image), 3),
            "foreground": round(float(np.mean(mask > 0)), 4),
            "values": " ".join(str(v) for v in values if v),
            "patch": name,
            "set": self.kind,
            "model": self.model,
            "weight": weight,
        }


def _classes(pairs: list[_Pair]) -> list[str]:
    """The dataset's class names (mask value - 1): as first met in patch order; one class when no file names any."""
    names = list(dict.fromkeys(c for pair in pairs for c in pair.object_classes.values()))
    return names or [DEFAULT_CLASS]


def _class_mask(labels: np.ndarray, object_classes: dict[int, str], classes: list[str]) -> np.ndarray:
    """Each object painted with its class's value (1-based in `classes`); objects without a class get 1."""
    lut = np.ones(int(labels.max()) + 1 if labels.size else 1, dtype=np.int64)
    lut[0] = 0
    for obj, name in object_classes.items():
        if 0 < obj < len(lut):
            lut[obj] = classes.index(name) + 1
    return lut[labels]


def _write_index(folder: Path, rows: list[dict], project: layout.Project, classes, review: dict, slides) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(FIELDS))
    writer.writeheader()
    writer.writerows(rows)
    (folder / "tiles.csv").write_text(text.getvalue())
    used = list(dict.fromkeys(r["source"] for r in rows))
    meta = {
        "tiles": len(rows),
        "tile_size": project.size,
        "overlap": 0,
        "mpp": project.mpp,
        "mask_values": "class" if project.task == "glomeruli" else "instance",
        "classes": {str(i): c for i, c in enumerate(classes, start=1)},
        "sources": [{"image": Path(s.path).name, "mpp": s.mpp} for s in slides.values() if Path(s.path).name in used],
        "review": review,
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
