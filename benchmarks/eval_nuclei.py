"""Judge nuclei models on NuInsSeg kidney (human and mouse apart), through the instance engine, on this CPU.

    python benchmarks/eval_nuclei.py [--model nuclei] [--model cellpose ...] [--mpp 0.25] [--limit N]

Each image is opened as a slide at `--mpp` (NuInsSeg states none; 40x is about
0.25 um/px) and segmented with `segment_instances_region` exactly as a napari or
CLI run would; the nuclei come back at the image's own pixels and are matched to
its instance labels one-to-one at IoU 0.5 (instance precision, recall, F1) and
scored by aggregated Jaccard (AJI), pooled over the images of each species. Speed:
seconds per 512 px image, and mm2 of tissue per minute on a whole-slide region
(CMU-1-Small-Region, 0.499 um/px). A model whose weights are missing here is
left out with the reason (random weights say nothing about accuracy).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

from _nuclei_data import NUINSSEG_MPP, SHARED, kidney_images, read_kidney
from _table import print_table
from napari_nephro.evaluation.instances import aggregated_jaccard, match_instances
from napari_nephro.inference.api import plan_run
from napari_nephro.inference.instance_api import segment_instances_region
from napari_nephro.inference.plan import slide_mpp
from napari_nephro.io import open_slide
from napari_nephro.models.errors import ModelError
from napari_nephro.models.nuclei import load_nuclei_model

SLIDE = SHARED / "wsi" / "CMU-1-Small-Region.svs"
LOOSE_IOU = 0.3  # a second F1 that tells a nucleus missed from one found with a loose outline


def evaluate(model, mpp: float, limit: int | None = None) -> tuple[dict, list[tuple]]:
    """Pooled counts per species, and one row per image."""
    pooled: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    rows = []
    for name, species, image, labels in kidney_images()[:limit]:
        _, truth = read_kidney(image, labels)
        with open_slide(image, mpp=mpp) as slide:
            started = time.perf_counter()
            found = segment_instances_region(slide, model, batch_size=getattr(model, "tiles_per_call", 1)).array
            seconds = time.perf_counter() - started
        match = match_instances(found, truth)
        loose = match_instances(found, truth, LOOSE_IOU)  # found at all, outline aside
        pooled[species]["tp_loose"] += loose.tp
        pooled[species]["fpfn_loose"] += loose.fp + loose.fn
        inter, union = aggregated_jaccard(found, truth, parts=True)
        for key, value in (
            ("tp", match.tp),
            ("fp", match.fp),
            ("fn", match.fn),
            ("inter", inter),
            ("union", union),
            ("seconds", seconds),
            ("images", 1),
            ("nuclei", match.n_true),
        ):
            pooled[species][key] += value
        rows.append(
            (name, match.n_true, match.n_pred, f"{match.f1 or 0:.3f}", f"{inter / union:.3f}", f"{seconds:.2f}")
        )
    return pooled, rows


def slide_speed(model) -> tuple[float, float, float]:
    """(mm2 of tissue per minute, mm2 of tiles computed per minute, seconds) on a whole-slide region.

    Glass is skipped as in a real run, but a tile at the tissue's edge costs as much as one
    full of tissue: the second rate is what a slide wholly covered by tissue would get.
    """
    with open_slide(SLIDE) as slide:
        started = time.perf_counter()
        result = segment_instances_region(slide, model, batch_size=getattr(model, "tiles_per_call", 1))
        seconds = time.perf_counter() - started
        plan = plan_run(slide, model)
        mpp = slide_mpp(slide)
    tissue = result.summary.tissue_mm2 if result.summary else None
    core = (model.tile_size - model.overlap) * model.mpp / 1000  # mm: a tile's side less its halo
    computed = min(plan.tissue_tiles * core**2, plan.region[2] * plan.region[3] * (mpp / 1000) ** 2)
    return (tissue or 0) / seconds * 60, computed / seconds * 60, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="nuclei model (default: nuclei, the shipped one)")
    parser.add_argument("--mpp", type=float, default=NUINSSEG_MPP, help="pixel size given to NuInsSeg images")
    parser.add_argument("--limit", type=int, help="first N images only (a quick look)")
    parser.add_argument("--per-image", action="store_true", help="also print one row per image")
    parser.add_argument("--no-slide", action="store_true", help="skip the whole-slide speed run")
    args = parser.parse_args()
    table, skipped = [], []
    for spec in args.model or ["nuclei"]:
        try:
            model = load_nuclei_model(spec, device="cpu")
        except ModelError as exc:
            skipped.append(f"{spec}: {exc}")
            continue
        pooled, rows = evaluate(model, args.mpp, args.limit)
        speed = None if args.no_slide else slide_speed(model)
        if args.per_image:
            print_table(f"{spec} per image", ("image", "nuclei", "found", "F1", "AJI", "s"), rows)
        for species in ("human", "mouse"):
            p = pooled.get(species)
            if not p:
                continue
            tp, fp, fn = p["tp"], p["fp"], p["fn"]
            table.append(
                (
                    spec,
                    f"{species} ({int(p['images'])} images, {int(p['nuclei'])} nuclei)",
                    f"{tp / max(tp + fp, 1):.3f}",
                    f"{tp / max(tp + fn, 1):.3f}",
                    f"{2 * tp / max(2 * tp + fp + fn, 1):.3f}",
                    f"{2 * p['tp_loose'] / max(2 * p['tp_loose'] + p['fpfn_loose'], 1):.3f}",
                    f"{p['inter'] / p['union']:.3f}",
                    f"{p['seconds'] / p['images']:.2f}",
                    "-" if speed is None else f"{speed[0]:.1f}",
                    "-" if speed is None else f"{speed[1]:.1f}",
                )
            )
    print_table(
        f"NuInsSeg kidney at {args.mpp} um/px: instance matching at IoU 0.5, pooled per species",
        (
            "model",
            "set",
            "precision",
            "recall",
            "F1",
            f"F1 @ IoU {LOOSE_IOU}",
            "AJI",
            "s / 512 px image",
            "mm2 tissue / min (slide)",
            "mm2 tiles / min",
        ),
        table,
    )
    for line in skipped:
        print(f"left out: {line}")
    print(f"(CPU threads: {np.__name__} / torch default; slide: {SLIDE.name})")


if __name__ == "__main__":
    main()
