"""Easy and hard sets: good predictions become labels as they are, fused-bad patches are corrected by hand.

Which good prediction becomes a patch's easy pair when several models are good
on it (`easy_pairs`):

- rule "agreement" (the default): the good model whose prediction agrees most
  with the other models' predictions on that patch (mean F1 at IoU 0.5 against
  every other model's, good or not). Objects that several independent models
  find alike are the likeliest to be right, so this prediction is the safest
  pseudo-label. Ties go to the first in `order` (the project's model order when
  not given).
- rule "order": the first good model in `order`, the user's preference (e.g. the
  model to be fine-tuned, so its pseudo-labels are in its own style); models
  not in `order` come after it, in the project's order.

A correction starts from the best prediction (`starting_point`): the best rated
model, ties broken by agreement with the others, then by the project's order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common.atomic import atomic_output
from . import layout
from .fusion import fuse
from .stats import patch_stats

RULES = ("agreement", "order")
RANK = {"good": 0, "medium": 1, "bad": 2}
Ratings = dict[tuple[str, str], str]


@dataclass(frozen=True)
class EasyPair:
    """A patch and the model whose good prediction on it serves as its label."""

    patch: str
    model: str


def model_order(project: layout.Project, order: list[str] | None) -> list[str]:
    """`order` first (checked against the project's models), then the project's other models in its order."""
    names = project.model_names
    if order is None:
        return names
    unknown = [m for m in order if m not in names]
    if unknown:
        raise layout.ReviewError(
            f"order: no model {', '.join(map(repr, unknown))} in this project: it has {', '.join(names)}"
        )
    return list(dict.fromkeys([*order, *names]))


def easy_pairs(
    root: str | os.PathLike[str], ratings: Ratings, *, rule: str = "agreement", order: list[str] | None = None
) -> list[EasyPair]:
    """One pair per patch with at least one good model, in patch order; see the module's doc for the rule."""
    if rule not in RULES:
        raise layout.ReviewError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    root = Path(root)
    project = layout.read_project(root)
    models = model_order(project, order)
    pairs = []
    for patch in (p.patch for p in layout.read_patches(root)):
        good = [m for m in models if ratings.get((patch, m)) == "good"]
        if not good:
            continue
        if rule == "agreement" and len(good) > 1:
            stats = patch_stats(root, patch, project.model_names)
            good = sorted(good, key=lambda m: -_or(stats.mean_agreement(m), -1.0))  # stable: ties keep `models` order
        pairs.append(EasyPair(patch, good[0]))
    return pairs


def hard_patches(root: str | os.PathLike[str], ratings: Ratings) -> list[str]:
    """The patches every model failed on (fused bad), in patch order: the ones to correct by hand."""
    root = Path(root)
    project = layout.read_project(root)
    patches = [p.patch for p in layout.read_patches(root)]
    return [p for p, r in fuse(ratings, patches, project.model_names).items() if r == "bad"]


def starting_point(root: str | os.PathLike[str], patch: str, ratings: Ratings) -> str:
    """The model whose prediction a correction of `patch` starts from: best rated, then most agreeing, then first."""
    root = Path(root)
    models = [m for m in layout.read_project(root).model_names if layout.prediction_tif(root, m, patch).is_file()]
    if not models:
        raise layout.ReviewError(f"{patch}: no model has a prediction on this patch yet; run nephro review predict")
    rank = {m: RANK.get(ratings.get((patch, m)), len(RANK)) for m in models}
    best = [m for m in models if rank[m] == min(rank.values())]
    if len(best) == 1:
        return best[0]
    stats = patch_stats(root, patch, models)
    return max(best, key=lambda m: _or(stats.mean_agreement(m), -1.0))  # max keeps the first of equals


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


# --- corrections ---------------------------------------------------------------------------------------------


def correction_classes(root: str | os.PathLike[str], patch: str) -> Path:
    """corrections/<patch>.classes.json: glomeruli with classes only, {"<id>": "<class name>"} as for predictions."""
    return Path(root) / "corrections" / f"{patch}.classes.json"


def save_correction(
    root: str | os.PathLike[str],
    patch: str,
    labels: np.ndarray,
    *,
    rater: str,
    started_from: str = "",
    classes: dict[int, str] | None = None,
) -> Path:
    """Save a hand-corrected label image of `patch` (the hard set) and record who made it from what.

    Ids are renumbered 1..n (painting leaves gaps), so the file says how many
    objects there are; `classes` (id -> class name, glomeruli) follow the
    renumbering. A label image of another size than the patch is refused. A
    second correction of a patch replaces the first.
    """
    root = Path(root)
    layout.check_name("rater", rater)
    project = layout.read_project(root)
    if patch not in {p.patch for p in layout.read_patches(root)}:
        raise layout.ReviewError(f"{patch}: no such patch in {root}")
    if started_from and started_from not in project.model_names:
        project.model(started_from)  # raises, naming the models
    labels = np.asarray(labels)
    expected = _patch_shape(root, patch, project)
    if labels.shape != expected:
        raise layout.ReviewError(
            f"{patch}: a correction must be {expected[1]}x{expected[0]} px like the patch, not {labels.shape}"
        )
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        raise layout.ReviewError(f"{patch}: a correction holds integer object ids, not {labels.dtype} values")
    if labels.size and labels.min() < 0:
        raise layout.ReviewError(f"{patch}: object ids must not be negative")
    relabelled, old_ids = relabel(labels)
    layout.write_labels(layout.correction_tif(root, patch), relabelled)
    names = correction_classes(root, patch)
    if classes:
        mapping = {str(new): classes[int(old)] for new, old in enumerate(old_ids, start=1) if int(old) in classes}
        with atomic_output(names) as tmp:
            tmp.write_text(json.dumps(mapping, indent=2) + "\n")
    else:
        names.unlink(missing_ok=True)
    row = {"patch": patch, "rater": rater, "started_from": started_from, "objects": len(old_ids), "time": layout.now()}
    layout.append_row(root / layout.CORRECTIONS_CSV, layout.CORRECTION_FIELDS, row)
    return layout.correction_tif(root, patch)


def relabel(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids renumbered 1..n in the order of the old ids, 0 kept as background; the old id of each new one)."""
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if ids.size and ids[0] == 0:
        return inverse.astype(np.uint32), ids[1:]
    return (inverse + 1).astype(np.uint32), ids


def _patch_shape(root: Path, patch: str, project: layout.Project) -> tuple[int, int]:
    from PIL import Image

    path = layout.patch_png(root, patch)
    if path.is_file():
        with Image.open(path) as image:
            return image.height, image.width
    return project.size, project.size


def corrected(root: str | os.PathLike[str]) -> set[str]:
    """The patches with a saved correction."""
    folder = Path(root) / "corrections"
    return {p.stem for p in folder.glob("*.tif") if not p.name.startswith(".")} if folder.is_dir() else set()


def corrections(root: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """patch -> its latest corrections.csv row (rater, started_from, objects, time)."""
    rows = layout.read_rows(Path(root) / layout.CORRECTIONS_CSV, layout.CORRECTION_FIELDS)
    return {row["patch"]: row for row in rows}
