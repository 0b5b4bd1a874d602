"""The default glomerulus model on held-out images, beside the model it replaced, in one run.

    python benchmarks/eval_default_model.py [--model CKPT ...] [--old REV] [--device cpu]

Every model is scored on the parts of ../shared/data that no shipped model trained
on (the split is in _glomeruli_data.py):

1. the held-out BUPT biopsies (PAS, PASM, Masson trichrome), at the pixel size
   estimated from each image's glomeruli, and at the one 0.5 um/px the earlier
   report assumed for all: pixel Dice (mean over images), crop Dice (each glomerulus
   cut out with a 25 % margin, as the BMC Nephrology paper scores crops), and
   instance precision / recall / F1 at IoU 0.5 over all images' objects pooled;
   per stain and per class (normal = gn, global sclerosis = gs, other = gl + gm;
   a class's pixel Dice leaves out the other classes' glomeruli);
2. the held-out AIDPATH PAS tiles at 0.5 um/px (the sample slide's four among them).

`--old REV` (default: the last commit that shipped the earlier default, c10f0b6) takes
that commit's `models/default` out of git, so the comparison needs no second copy.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from skimage.measure import label

from _glomeruli_data import (
    AIDPATH,
    AIDPATH_MPP,
    BUPT,
    CLASS_GROUPS,
    HELD_OUT_AIDPATH,
    bupt_held_out,
    bupt_mpp,
    stain,
)
from _table import print_table
from napari_nephro.annotations.raster import rasterize
from napari_nephro.evaluation import match_instances, per_crop
from napari_nephro.inference import segment_region
from napari_nephro.io import open_slide
from napari_nephro.models import TorchSegmenter
from napari_nephro.pipelines.export import load_items

OLD_REV = "c10f0b6"
REPO = Path(__file__).resolve().parents[1]


def options(name: str, default: list[str]) -> list[str]:
    if name not in sys.argv:
        return default
    i = sys.argv.index(name) + 1
    values = []
    while i < len(sys.argv) and not sys.argv[i].startswith("--"):
        values.append(sys.argv[i])
        i += 1
    return values


def old_default(rev: str, folder: Path) -> Path:
    """The `models/default` folder as commit `rev` shipped it."""
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        blob = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:src/napari_nephro/models/default/{name}"],
            check=True,
            capture_output=True,
        ).stdout
        (folder / name).write_bytes(blob)
    return folder


def score_image(pred: np.ndarray, truth_inst: np.ndarray, truth_class: dict[int, str]) -> dict:
    """Pixel Dice, matched instances, crops and per-class Dice of one image's class map against its objects."""
    fg, true_fg = pred > 0, truth_inst > 0
    inter, size = int((fg & true_fg).sum()), int(fg.sum() + true_fg.sum())
    pred_inst = label(fg, connectivity=1)
    match = match_instances(pred_inst, truth_inst)
    crops = per_crop(fg.astype(np.uint8), truth_inst)
    per_class = {}
    for name in set(truth_class.values()):
        mine = np.isin(truth_inst, [i for i, c in truth_class.items() if c == name])
        others = true_fg & ~mine
        p = fg & ~others
        per_class[name] = 2 * int((p & mine).sum()) / max(1, int(p.sum() + mine.sum()))
    return {
        "dice": 2 * inter / size if size else None,
        "tp": match.tp,
        "fp": match.fp,
        "fn": match.fn,
        "crops": [(truth_class[c["truth_id"]], c["dice"]) for c in crops if c["dice"] is not None],
        "per_class": per_class,
        "objects": int(pred_inst.max()),
    }


def predict(model, image: Path, mpp: float) -> np.ndarray:
    return segment_region(open_slide(image, mpp=mpp), model).array


def truth_of(item, shape) -> tuple[np.ndarray, dict[int, str]]:
    annotations = item.vectors()
    inst = rasterize(annotations, shape, values="instance")
    return inst, {i: CLASS_GROUPS.get(a.label, a.label) for i, a in enumerate(annotations, start=1)}


def pooled(rows: list[dict]) -> tuple[str, str, str]:
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
    p = tp / (tp + fp) if tp + fp else None
    r = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return tuple("-" if v is None else f"{v:.3f}" for v in (p, r, f1))


def scores(rows: list[dict]) -> tuple:
    """images, glomeruli, objects found, Dice, crop Dice, precision, recall, F1 of a group of images."""
    return (
        len(rows),
        sum(len(r["crops"]) for r in rows),
        sum(r["objects"] for r in rows),
        mean(r["dice"] for r in rows),
        mean(d for r in rows for _, d in r["crops"]),
        *pooled(rows),
    )


def mean(values) -> str:
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-"


def bupt(models: dict, calibrated: bool) -> None:
    mpp = bupt_mpp()
    items = [i for i in load_items(BUPT / "annotations.json", slide=BUPT / "images") if bupt_held_out(i.name)]
    results = {name: {} for name in models}
    for item in items:
        image_mpp = mpp[item.name] if calibrated else 0.5
        truth, classes = truth_of(item, item.shape)
        for name, model in models.items():
            results[name][item.name] = score_image(predict(model, item.image, image_mpp), truth, classes)
    scale = "at pixel sizes estimated from the glomeruli" if calibrated else "at an assumed 0.5 um/px"
    rows = []
    for name, by_image in results.items():
        groups = defaultdict(list)
        for image, row in by_image.items():
            groups[stain(image)].append(row)
        groups["all"] = list(by_image.values())
        for group, members in groups.items():
            rows.append((name, group, *scores(members)))
    print_table(
        f"Held-out BUPT biopsies ({len(items)} images) {scale}",
        ("model", "stain", "images", "glomeruli", "found", "Dice", "crop Dice", "precision", "recall", "F1 @0.5"),
        rows,
    )
    rows = []
    for name, by_image in results.items():
        classes = sorted({c for r in by_image.values() for c, _ in r["crops"]})
        for c in classes:
            holding = [r for r in by_image.values() if c in r["per_class"]]
            crops = [d for r in by_image.values() for k, d in r["crops"] if k == c]
            rows.append((name, c, len(holding), len(crops), mean(r["per_class"][c] for r in holding), mean(crops)))
    print_table(
        f"Held-out BUPT per class {scale} (Dice on the images holding the class, other classes left out)",
        ("model", "class", "images", "glomeruli", "Dice", "crop Dice"),
        rows,
    )


def aidpath(models: dict) -> None:
    items = [i for i in load_items(AIDPATH / "masks", slide=AIDPATH / "images") if i.name in HELD_OUT_AIDPATH]
    rows = []
    for name, model in models.items():
        scored = []
        for item in items:
            truth, classes = truth_of(item, item.shape)
            scored.append(score_image(predict(model, item.image, AIDPATH_MPP), truth, classes))
        rows.append((name, *scores(scored)))
    print_table(
        "Held-out AIDPATH PAS tiles at 0.5 um/px",
        ("model", "images", "glomeruli", "found", "Dice", "crop Dice", "precision", "recall", "F1 @0.5"),
        rows,
    )


def main() -> None:
    device = options("--device", ["cpu"])[0]
    with tempfile.TemporaryDirectory() as tmp:
        names = options("--model", ["default"])
        models = {name: TorchSegmenter.from_checkpoint(name, device=device) for name in names}
        rev = options("--old", [OLD_REV])[0]
        if rev != "none":
            models[f"old ({rev})"] = TorchSegmenter.from_checkpoint(old_default(rev, Path(tmp) / "old"), device=device)
        bupt(models, calibrated=True)
        bupt(models, calibrated=False)
        aidpath(models)


if __name__ == "__main__":
    main()
