"""Training throughput on the AIDPATH PAS tiles, on this machine's CPU.

    python benchmarks/bench_train.py

The default model's geometry and recipe (U-Net with a MobileNet-V2 encoder,
512 px tiles at 0.5 um/px resized to 256, batch 8): time to cut the tiles, one
epoch with and without the augmentations, tiles per second, and the share of an
epoch spent augmenting.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from _table import print_table
from napari_nephro.models import ModelConfig
from napari_nephro.pipelines.export import load_items
from napari_nephro.training import Recipe, cut_tiles, train

DATA = Path(os.environ.get("NEPHRO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
GEOMETRY = {"mpp": 0.5, "tile_size": 512, "overlap": 128, "input_size": 256}


def main() -> None:
    root = DATA / "glomeruli" / "aidpath_pas"
    t0 = time.perf_counter()
    items = load_items(root / "masks", slide=root / "images")
    tiles = cut_tiles(items, classes=["glomerulus"], mpp=0.5, tile=512, overlap=128, input_size=256, image_mpp=0.5)
    cut = time.perf_counter() - t0
    config = ModelConfig(
        arch="unet", encoder="mobilenet_v2", decoder={"decoder_channels": [128, 64, 32, 16, 8]}, **GEOMETRY
    )
    rows = [("cut tiles (24 images)", len(tiles), f"{cut:.1f} s", f"{len(tiles) / cut:.0f}", "-")]
    seconds = {}
    for augment in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            result = train(
                tiles, config, Path(tmp) / "m", recipe=Recipe(epochs=1, batch_size=8, augment=augment), device="cpu"
            )
        epoch = result.history[0]
        n_train = round(len(tiles) * 0.8)
        seconds[augment] = epoch.seconds
        rows.append(
            (
                f"one epoch, {'with' if augment else 'without'} augmentation",
                n_train,
                f"{epoch.seconds:.1f} s",
                f"{n_train / epoch.seconds:.1f}",
                f"{seconds[augment] / seconds.get(True, seconds[augment]):.2f}",
            )
        )
    print_table(
        "Training on CPU (U-Net MobileNet-V2, 256 px input, batch 8; epoch includes validation)",
        ("step", "tiles", "time", "tiles/s", "vs augmented epoch"),
        rows,
    )


if __name__ == "__main__":
    main()
