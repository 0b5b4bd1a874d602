"""Train the shipped nuclei model on MICCAI 2015 + MoNuSeg (37 images, 13,000 nuclei), on a CPU.

    python benchmarks/train_nuclei_model.py --out nuclei-model [--epochs 36] [--steps 50] [--resume]
    # then: copy nuclei-model/* to src/napari_nephro/models/default_nuclei/
    python benchmarks/train_nuclei_model.py --tune-only FOLDER   # a model trained before tuning existed

A U-Net with a MobileNetV2 encoder (random init: no ImageNet weights offline) and
HoVer-Net's heads, at 0.5 um/px (20x): nuclei of 5-10 um are 10-20 px, and the
whole runs cover about 2.3 mm2 of tissue a minute on two CPU cores. Each tile is
contrast-stretched (1st to 99th percentile per channel) before the network, in
training and in use: hazy or pale scans then look like crisp ones. At the end the
HoVer marker threshold is tuned on the validation images (`tune_post_processing`)
and written to config.json. NuInsSeg kidney is never
used here (benchmarks/eval_nuclei.py judges on it). Training is resumable
(`--resume`) and deterministic on a CPU for a fixed thread count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _nuclei_data import TERMS, training_images
from napari_nephro.pipelines.train_nuclei import nuclei_config
from napari_nephro.training.nuclei_loop import NucleiRecipe, train_nuclei, tune_post_processing


def model_config():
    """The library's fresh nuclei network (`nephro train --task nuclei`'s), with the shipped model's card."""
    config = nuclei_config()
    config.provenance = {
        "name": "napari-nephro nuclei model",
        "data": TERMS,
        "licence": "trained on MoNuSeg (CC BY-NC-SA 4.0): non-commercial use",
        "evaluation": "NuInsSeg kidney, never trained on: see docs/models.md",
    }
    return config


def tune_only(folder: Path) -> None:
    """Tune the marker threshold of a trained folder on the validation images its config.json names."""
    import torch

    from napari_nephro.common.atomic import atomic_output
    from napari_nephro.models.checkpoint import CONFIG, load_checkpoint
    from napari_nephro.models.hover_segmenter import post_processing

    network, config = load_checkpoint(folder, "cpu")
    names = set(config.provenance["images"]["validation"])
    val = [item for item in training_images(config.mpp) if item.name in names]
    if len(val) != len(names):
        sys.exit(f"{folder}: {len(names) - len(val)} of its validation images are not in ../shared/data/nuclei")
    norm = config.normalization
    mean = torch.tensor(norm["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"]).view(1, 3, 1, 1)
    start = post_processing(config.mpp, config.post_processing)
    tuned = tune_post_processing(network, val, torch.device("cpu"), mean, std, start, norm)
    config.post_processing = {**(config.post_processing or {}), "marker_threshold": tuned.marker_threshold}
    config.provenance["post_processing"] = {
        "tuned_on": "the validation images",
        "marker_threshold_grid": list(tuned.grid),
        "val_f1_before": round(tuned.f1_before, 4),
        "val_f1": round(tuned.f1, 4),
    }
    with atomic_output(folder / CONFIG) as tmp:
        Path(tmp).write_text(config.to_json() + "\n")
    print(f"{folder}: marker threshold {tuned.marker_threshold}, validation F1 {tuned.f1_before:.3f} -> {tuned.f1:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tune-only", type=Path, metavar="FOLDER", help="only tune a trained folder's post-processing")
    parser.add_argument("--epochs", type=int, default=NucleiRecipe.epochs)
    parser.add_argument("--steps", type=int, default=NucleiRecipe.steps_per_epoch)
    parser.add_argument("--batch", type=int, default=NucleiRecipe.batch_size)
    parser.add_argument("--crop", type=int, default=NucleiRecipe.crop)
    parser.add_argument("--lr", type=float, default=NucleiRecipe.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if args.tune_only:
        return tune_only(args.tune_only)
    if args.out is None:
        parser.error("--out is required")
    started = time.perf_counter()
    config = model_config()
    images = training_images(config.mpp)
    print(
        f"{len(images)} images, {sum(i.count for i in images)} nuclei at {config.mpp} um/px "
        f"({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    recipe = NucleiRecipe(
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        batch_size=args.batch,
        crop=args.crop,
        lr=args.lr,
        seed=args.seed,
    )

    def on_epoch(e) -> None:
        print(
            f"epoch {e.epoch:3d} train {e.train_loss:.4f} val {e.val_loss:.4f} F1 {e.val_f1:.4f} "
            f"AJI {e.val_aji:.4f} lr {e.lr:.2e} ({e.seconds:.0f} s)",
            flush=True,
        )

    result = train_nuclei(
        images,
        config,
        args.out,
        recipe=recipe,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        on_epoch=on_epoch,
    )
    if result.path is None:
        sys.exit("stopped early: --resume to finish")
    print(f"{result.path}: best epoch {result.best_epoch}, validation F1 {result.best_f1:.3f}")


if __name__ == "__main__":
    main()
