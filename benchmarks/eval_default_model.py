"""Dice of a glomerulus checkpoint (default: the shipped model) on the development images, per stain and class.

    python benchmarks/eval_default_model.py [--model CKPT] [--mpp 0.5]

1. the 42 BUPT renal biopsy images (PAS, PASM, Masson trichrome; 66 glomeruli),
   never seen in training: pixel Dice per image, mean per stain; Dice per class
   (normal = gn, global sclerosis = gs, other lesions = gl + gm) on the pixels that
   are not another class's truth; per-crop Dice (each glomerulus cut out with a
   25 % margin, as the BMC Nephrology paper scores crops); instance F1 at IoU 0.5.
   Their pixel size is unknown (glomeruli span 150 to 450 px): --mpp gives the one assumed.
2. the 24 AIDPATH PAS tiles the default model learned from, split as in training:
   validation images apart from training images.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from _table import print_table
from napari_nephro.inference import segment_region
from napari_nephro.io import open_slide
from napari_nephro.models import TorchSegmenter, resolve_checkpoint
from napari_nephro.pipelines import evaluate

DATA = Path(os.environ.get("NEPHRO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CLASS_GROUPS = {"gn": "normal", "gs": "global sclerosis", "gl": "other lesions", "gm": "other lesions"}


def option(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def predict_folder(model, images: list[Path], out: Path, mpp: float) -> None:
    for image in images:
        result = segment_region(open_slide(image, mpp=mpp), model)
        Image.fromarray(result.array).save(out / f"{image.stem}.png")


def stain(name: str) -> str:
    for s in ("PASM", "PAS", "Masson", "HE"):
        if f"-{s}" in name:
            return s
    return "?"


def bupt(model, mpp: float) -> None:
    folder = DATA / "glomeruli" / "bupt_multistain_dev"
    coco = json.loads((folder / "annotations.json").read_text())
    # the classes merged as the paper reports them: normal, global sclerosis, other
    for category in coco["categories"]:
        category["name"] = CLASS_GROUPS.get(category["name"], category["name"])
    images = sorted((folder / "images").iterdir())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "truth.json").write_text(json.dumps(coco))
        (tmp / "pred").mkdir()
        predict_folder(model, images, tmp / "pred", mpp)
        report = evaluate(tmp / "pred", tmp / "truth.json", crops=True)
    by_stain, by_class = defaultdict(list), defaultdict(list)
    names = {Path(i["file_name"]).stem: i["id"] for i in coco["images"]}
    labels = {c["id"]: c["name"] for c in coco["categories"]}
    truth_class = defaultdict(list)
    for ann in coco["annotations"]:
        truth_class[ann["image_id"]].append(labels[ann["category_id"]])
    for row in report["images"]:
        by_stain[stain(row["image"])].append(row)
        for name, scores in row.get("per_class", {}).items():
            if scores.get("dice") is not None and name in truth_class[names[row["image"]]]:
                by_class[name].append(scores["dice"])
    rows = []
    for name, group in sorted(by_stain.items()):
        dice = [r["dice"] for r in group if r["dice"] is not None]
        f1 = [r["f1"] for r in group if r["f1"] is not None]
        crop = [r["crop_dice_mean"] for r in group if r.get("crop_dice_mean") is not None]
        rows.append((name, len(group), sum(r["n_true"] for r in group), _mean(dice), _mean(crop), _mean(f1)))
    s = report["summary"]
    rows.append(
        (
            "all",
            len(report["images"]),
            sum(r["n_true"] for r in report["images"]),
            f"{s['dice']['mean']:.3f}",
            _mean([r["crop_dice_mean"] for r in report["images"] if r.get("crop_dice_mean") is not None]),
            f"{s['f1']['mean']:.3f}",
        )
    )
    print_table(
        f"BUPT development images at an assumed {mpp} um/px, per stain",
        ("stain", "images", "glomeruli", "Dice", "crop Dice", "F1 @0.5"),
        rows,
    )
    rows = [(name, len(v), _mean(v)) for name, v in sorted(by_class.items())]
    print_table(
        "BUPT per class (Dice on the images holding the class, other classes' pixels left out)",
        ("class", "images", "Dice"),
        rows,
    )


def aidpath(model, folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    sources = set(config.get("provenance", {}).get("tiles", {}).get("sources", []))
    history = config.get("provenance", {}).get("history", [])
    root = DATA / "glomeruli" / "aidpath_pas"
    images = sorted((root / "images").iterdir())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        predict_folder(model, images, tmp, 0.5)
        report = evaluate(tmp, root / "masks")
    rows = []
    # the validation images are those the checkpoint's training history did not train on:
    # the split is re-derived from the recorded recipe (seed, fraction) over the recorded sources
    from napari_nephro.training import split_by_group

    recipe = config.get("provenance", {}).get("recipe", {})
    names = sorted(sources)
    if names and recipe:
        _, val_i = split_by_group(names, recipe["val_fraction"], recipe["seed"])
        val = {names[i] for i in val_i}
    else:
        val = set()
    for part, keep in (("validation", lambda n: n in val), ("training", lambda n: n not in val)):
        group = [r for r in report["images"] if keep(r["image"])]
        if group:
            rows.append(
                (
                    part,
                    len(group),
                    _mean([r["dice"] for r in group if r["dice"] is not None]),
                    _mean([r["f1"] for r in group if r["f1"] is not None]),
                )
            )
    best = max(history, key=lambda e: e["val_dice"]) if history else None
    note = f" (training's own validation Dice, tiles: {best['val_dice']:.3f} at epoch {best['epoch']})" if best else ""
    print_table("AIDPATH PAS tiles at 0.5 um/px" + note, ("images", "n", "Dice", "F1 @0.5"), rows)


def _mean(values) -> str:
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-"


def main() -> None:
    name = option("--model", "default")
    model = TorchSegmenter.from_checkpoint(name, device=option("--device", "auto"))
    bupt(model, float(option("--mpp", "0.5")))
    aidpath(model, resolve_checkpoint(name))


if __name__ == "__main__":
    main()
