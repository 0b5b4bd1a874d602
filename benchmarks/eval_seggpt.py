"""The paper's few-shot experiment on the BUPT development images: SegGPT with 2 or 4 examples per class.

    python benchmarks/eval_seggpt.py --weights seggpt-vit-large [--shots 2 4] [--device cuda] [--mpp 0.5]
    python benchmarks/eval_seggpt.py --tiny      # a random toy SegGPT: checks the pipeline, the figures mean nothing

Examples are drawn (`nephro prompts add --per-class K`) from the biopsies of one half
of the images, and SegGPT segments the images of the other biopsies, so no prompt
comes from a biopsy it is scored on. Classes: normal (gn) and global sclerosis (gs);
the other lesions (gl, gm) are neither prompted nor scored as a class. Scores as
eval_default_model.py: pixel Dice per image, per-crop Dice (each glomerulus with a
25 % margin, as the BMC Nephrology paper scores crops), instance F1 at IoU 0.5, and
Dice per class on the images that hold it. The images' pixel size is unknown
(glomeruli span 150 to 450 px): --mpp gives the one assumed. Crops and tiles are
448 px at 1 um/px. ViT-L needs a GPU here: on a 2-core CPU one image takes about
15 minutes with 12 prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from _table import print_table
from napari_nephro.inference import segment_region
from napari_nephro.io import open_slide
from napari_nephro.models.seggpt import SegGptSegmenter
from napari_nephro.pipelines import evaluate
from napari_nephro.pipelines.prompts import add_from_files

DATA = Path(os.environ.get("NEPHRO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
BUPT = DATA / "glomeruli" / "bupt_multistain_dev"
CLASSES = {"gn": "normal", "gs": "global sclerosis"}


def biopsy(file_name: str) -> str:
    return Path(file_name).stem.split("-")[0]


def split(coco: dict) -> tuple[dict, dict]:
    """Two COCO files: the images of every other biopsy (prompts), and the rest (scored)."""
    biopsies = sorted({biopsy(i["file_name"]) for i in coco["images"]})
    prompt_biopsies = set(biopsies[::2])
    parts = []
    for keep in (lambda b: b in prompt_biopsies, lambda b: b not in prompt_biopsies):
        images = [i for i in coco["images"] if keep(biopsy(i["file_name"]))]
        ids = {i["id"] for i in images}
        annotations = [a for a in coco["annotations"] if a["image_id"] in ids]
        parts.append({**coco, "images": images, "annotations": annotations})
    return parts[0], parts[1]


def load_tiny(folder: Path) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import tiny_seggpt

    tiny_seggpt(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", help="a SegGPT folder (hf download BAAI/seggpt-vit-large) or a Hub id")
    parser.add_argument("--tiny", action="store_true", help="a random toy SegGPT instead (pipeline check only)")
    parser.add_argument("--shots", type=int, nargs="+", default=[2, 4], help="examples per class")
    parser.add_argument("--mpp", type=float, default=0.5, help="assumed micrometres per pixel of the images")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mode", default="per_class", choices=("per_class", "palette"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.weights and not args.tiny:
        parser.error("give --weights FOLDER (or --tiny for a pipeline check)")
    coco = json.loads((BUPT / "annotations.json").read_text())
    for category in coco["categories"]:
        category["name"] = CLASSES.get(category["name"], "other lesion")
    prompt_part, scored_part = split(coco)
    rows, class_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = str(load_tiny(tmp / "tiny")) if args.tiny else args.weights
        (tmp / "prompt.json").write_text(json.dumps(prompt_part))
        (tmp / "truth.json").write_text(json.dumps(scored_part))
        for shots in args.shots:
            added = add_from_files(
                tmp / f"prompts-{shots}",
                tmp / "prompt.json",
                BUPT / "images",
                classes=list(CLASSES.values()),
                class_map={"other lesion": "ignore"},
                mpp=1.0,
                per_class=shots,
                seed=args.seed,
                image_mpp=args.mpp,
            )
            segmenter = SegGptSegmenter.load(weights, added.prompts, device=args.device, mode=args.mode)
            pred = tmp / f"pred-{shots}"
            pred.mkdir()
            start = time.perf_counter()
            for image in scored_part["images"]:
                path = BUPT / "images" / Path(image["file_name"]).name
                result = segment_region(open_slide(path, mpp=args.mpp), segmenter)
                Image.fromarray(result.array).save(pred / f"{path.stem}.png")
            seconds = (time.perf_counter() - start) / len(scored_part["images"])
            report = evaluate(pred, tmp / "truth.json", crops=True)
            images = report["images"]
            rows.append(
                (
                    shots,
                    added.prompts.describe().split(" (")[0].replace(" examples", ""),
                    len(images),
                    _mean([r["dice"] for r in images]),
                    _mean([r.get("crop_dice_mean") for r in images]),
                    _mean([r["f1"] for r in images]),
                    f"{seconds:.1f}",
                )
            )
            class_rows += per_class(shots, images, scored_part)
    what = "random toy SegGPT (figures meaningless)" if args.tiny else f"SegGPT {weights}"
    print_table(
        f"BUPT: {what}, {args.mode}, examples from half the biopsies, scored on the others, at {args.mpp} um/px",
        ("shots/class", "prompts", "images", "Dice", "crop Dice", "F1 @0.5", "s/image"),
        rows,
    )
    print_table(
        "per class (Dice on the images holding the class)", ("shots/class", "class", "images", "Dice"), class_rows
    )


def per_class(shots: int, images: list[dict], coco: dict) -> list[tuple]:
    names = {Path(i["file_name"]).stem: i["id"] for i in coco["images"]}
    labels = {c["id"]: c["name"] for c in coco["categories"]}
    present = defaultdict(set)
    for ann in coco["annotations"]:
        present[ann["image_id"]].add(labels[ann["category_id"]])
    by_class = defaultdict(list)
    for row in images:
        for name, scores in row.get("per_class", {}).items():
            if scores.get("dice") is not None and name in present[names[row["image"]]]:
                by_class[name].append(scores["dice"])
    return [(shots, name, len(v), _mean(v)) for name, v in sorted(by_class.items()) if name in CLASSES.values()]


def _mean(values) -> str:
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-"


if __name__ == "__main__":
    main()
