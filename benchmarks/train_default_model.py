"""Train the default glomerulus model on every annotated glomerulus we may train on.

    python benchmarks/train_default_model.py --out default-model [--overlap 384] [--epochs 200]
        [--encoder mobilenet_v2] [--lr 1e-3] [--decoder-channels 128 64 32 16 8] [--seed 0] [--device cpu]

Data (see _glomeruli_data.py): the AIDPATH PAS tiles and the BUPT PAS / PASM /
trichrome images that are not held out, BUPT at pixel sizes estimated from their
glomeruli. All BUPT classes are one class, glomerulus. The network works at
3.2 um/px, the BMC Nephrology paper's scale: 512 px tiles at 1 um/px resized to
160 px, so a glomerulus (~180 um) is ~56 px and a tile (512 um) holds it with its
surroundings. Training tiles overlap by 384 px (`--overlap`), so each glomerulus is
seen at many places in a tile; segmenting, the model's tiles overlap by 128 px. The recipe is the
library's (`nephro train`'s): BCE + soft Dice, AdamW, warm-up then cosine, flips,
rotations, shifts, zoom, HED stain jitter. The checkpoint gets the object rules the
engine applies (fill holes, drop < 2,000 um2, split touching glomeruli, smooth
outlines) and flip test-time augmentation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _glomeruli_data import (
    AIDPATH,
    AIDPATH_MPP,
    BUPT,
    HELD_OUT_AIDPATH,
    bupt_held_out,
    bupt_mpp,
)
from napari_nephro.pipelines.export import load_items
from napari_nephro.pipelines.train import train_items
from napari_nephro.training import Recipe
from napari_nephro.training.augment import SCALE_JITTER, STAIN_JITTER
from napari_nephro.training.loop import LOSSES

SEGMENT_OVERLAP = 128  # px at 1 um/px between the tiles of a segmentation run
ATTRIBUTION = (
    "AIDPATH glomeruli (CC BY 4.0), PAS tiles via sarah-antillia/TensorFlow-FlexUNet-Tiled-Image-Segmentation-"
    "Glomeruli; BUPT multistain renal biopsies (Jiang et al., Am J Pathol 2021; bupt-ai-cz/Glomeruli-Instance-"
    "Segmentation, no licence stated)"
)


def training_items():
    aidpath = [i for i in load_items(AIDPATH / "masks", slide=AIDPATH / "images") if i.name not in HELD_OUT_AIDPATH]
    for item in aidpath:
        item.mpp = AIDPATH_MPP
    mpp = bupt_mpp()
    bupt = [i for i in load_items(BUPT / "annotations.json", slide=BUPT / "images") if not bupt_held_out(i.name)]
    for item in bupt:
        item.mpp = mpp[item.name]
    return aidpath + bupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--encoder", default="mobilenet_v2")
    parser.add_argument("--decoder-channels", type=int, nargs="+", default=[128, 64, 32, 16, 8])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss", default="dice", choices=LOSSES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mpp", type=float, default=1.0)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=384)
    parser.add_argument("--input", type=int, default=160)
    parser.add_argument("--stain-jitter", type=float, default=STAIN_JITTER)
    parser.add_argument("--scale-jitter", type=float, default=SCALE_JITTER)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--half", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    items = training_items()
    recipe = Recipe(
        epochs=args.epochs,
        batch_size=args.batch,
        lr=args.lr,
        seed=args.seed,
        val_fraction=args.val_fraction,
        loss=args.loss,
        stain_jitter=args.stain_jitter,
        scale_jitter=args.scale_jitter,
    )

    def on_epoch(e) -> None:
        print(
            f"epoch {e.epoch:4d}  loss {e.train_loss:.3f}  val loss {e.val_loss:.3f}  val Dice {e.val_dice:.3f}  "
            f"lr {e.lr:.2e}  {e.seconds:.1f} s",
            flush=True,
        )

    result = train_items(
        items,
        args.out,
        data={"script": "benchmarks/train_default_model.py", "aidpath": str(AIDPATH), "bupt": str(BUPT)},
        arch="unet",
        encoder=args.encoder,
        decoder_channels=args.decoder_channels,
        mpp=args.mpp,
        tile=args.tile,
        overlap=args.overlap,
        input_size=args.input,
        recipe=recipe,
        device=args.device,
        half=args.half,
        attribution=ATTRIBUTION,
        resume=args.resume,
        overwrite=args.overwrite,
        on_cut=None,
        on_epoch=on_epoch,
    )
    if result.path is not None:
        ship_rules(result.path)
    print(json.dumps({"path": str(result.path), "best_epoch": result.best_epoch, "val_dice": result.best_dice}))


def ship_rules(folder: Path) -> None:
    """What the engine does with the network's output: whole objects, and the mean over flipped tiles."""
    from napari_nephro.common.atomic import atomic_output
    from napari_nephro.inference.objects import ObjectRules
    from napari_nephro.models import ModelConfig

    config = ModelConfig.from_file(folder / "config.json")
    config.objects, config.flips = ObjectRules().to_config(), True
    config.overlap = SEGMENT_OVERLAP  # the training overlap multiplies examples; segmenting, it would multiply time
    with atomic_output(folder / "config.json") as tmp:
        tmp.write_text(config.to_json())


if __name__ == "__main__":
    main()
