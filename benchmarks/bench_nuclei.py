"""Nuclei benchmarks, printed as tables.

    python benchmarks/bench_nuclei.py [--quick] [--device cuda] [--only speed|overhead|memory|matching]

1. speed: tiles and megapixels per second of each family at its own scale and
   tile size, through the instance engine on a real slide region (CMU-1-Small-Region),
   with real-size networks. Weights cannot be downloaded here, so the networks
   are random: their times are real, the nuclei they find are not, so nuclei per
   second is given only for the classical segmenter (dark blobs), whose count is;
2. overhead: end-to-end time of a whole-slide run (plan, read, model, keep objects
   by tile core, write the uint32 pyramid and the table) over the model's own time;
3. memory: peak resident memory of whole-slide nuclei runs on a lazily generated
   large virtual slide and on a small one (each in its own process);
4. matching: instance matching at IoU 0.5 of 10,000 objects, ours against
   `stardist.matching.matching`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from _table import print_table
from bench_segment import VirtualSlideBackend, option, rss_mib
from napari_nephro.inference.instance_api import segment_instances_region, segment_instances_slide
from napari_nephro.io import open_slide
from napari_nephro.models.instances import TileInstances

DATA = Path(os.environ.get("NEPHRO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CMU = DATA / "wsi" / "CMU-1-Small-Region.svs"


class DarkBlobs:
    """Connected dark pixels as nuclei: a model that costs almost nothing, so the engine's own cost shows."""

    kind, fingerprint, device = "instance", "dark-blobs", "cpu"

    def __init__(self, mpp: float = 0.5, tile_size: int = 512, overlap: int = 64) -> None:
        self.classes = ["nucleus"]
        self.mpp, self.tile_size, self.overlap = mpp, tile_size, overlap

    def predict_instances(self, tiles: np.ndarray) -> list[TileInstances]:
        out = []
        for tile in tiles:
            labels, _ = ndimage.label(tile.mean(axis=-1) < 120)
            out.append(TileInstances.from_labels(labels))
        return out


def families(device: str) -> list[tuple[str, object]]:
    """Each family at real size with random weights (what can be had here), and the classical reference."""
    found: list[tuple[str, object]] = [("dark blobs (engine only)", DarkBlobs())]
    for name, build in _builders():
        try:
            found.append((name, build(device)))
        except Exception as exc:  # an optional family that is not installed: say so in the table
            found.append((f"{name}: {type(exc).__name__}: {exc}"[:120], None))
    return found


def _builders():
    return [
        ("Cellpose classic nuclei (random)", random_cellpose),
        ("StarDist 2D_versatile_he layout (random)", random_stardist),
        ("CellViT-256 (random)", random_cellvit_256),
    ]


def random_cellpose(device: str):
    import torch

    from napari_nephro.models.cellpose_adapter import NUCLEI_DIAMETER_PX, CellposeClassicSegmenter
    from napari_nephro.models.cellpose_classic import CellposeNet
    from napari_nephro.models.device import pick_device

    torch.manual_seed(0)
    return CellposeClassicSegmenter(
        CellposeNet(diam_mean=NUCLEI_DIAMETER_PX), name="nuclei", device=pick_device(device)
    )


_WRITE_STARDIST = """
import sys
import keras
from stardist.models import Config2D, StarDist2D

keras.utils.set_random_seed(0)
model = StarDist2D(Config2D(n_channel_in=3), name="random", basedir=sys.argv[1])  # 2D_versatile_he's layout
model.keras_model.save_weights(sys.argv[1] + "/random/weights_best.h5")
"""


def random_stardist(device: str):
    """Config2D's defaults (32 rays, grid 2, the versatile H&E model's layout), random, in a model folder
    written by a separate process: TensorFlow never enters this one."""
    from napari_nephro.models import stardist_adapter

    folder = Path(tempfile.mkdtemp(prefix="stardist-bench-"))
    subprocess.run([sys.executable, "-c", _WRITE_STARDIST, str(folder)], check=True, capture_output=True)
    return stardist_adapter.load(folder / "random", device=device)


def random_cellvit_256(device: str):
    import torch

    from napari_nephro.models.cellvit import CellViTSegmenter, CellViTSpec, build_cellvit
    from napari_nephro.models.device import pick_device

    torch.manual_seed(0)
    return CellViTSegmenter(
        build_cellvit(CellViTSpec("CellViT256")), CellViTSpec("CellViT256"), device=pick_device(device)
    )


def speed_table(quick: bool, device: str) -> None:
    slide = open_slide(CMU)
    rows = []
    for name, model in families(device):
        if model is None:
            rows.append((name, "-", "-", "-", "-", "-"))
            continue
        side = model.tile_size * model.mpp / slide.mpp  # one to four tiles' worth of slide, at its scale
        box = (0, 0, side * (1 if quick else 2), side * (1 if quick else 2))
        t0 = time.perf_counter()
        result = segment_instances_region(slide, model, box, skip_background=False, batch_size=1)
        seconds = time.perf_counter() - t0
        megapixels = result.stats.predicted * model.tile_size**2 / 1e6
        nuclei = f"{len(result.nuclei) / seconds:.0f}" if isinstance(model, DarkBlobs) else "(random weights)"
        rows.append(
            (
                name,
                f"{model.mpp:g} um/px, {model.tile_size} px",
                str(result.stats.predicted),
                f"{result.stats.predicted / seconds:.3f}",
                f"{megapixels / seconds:.3f}",
                nuclei,
            )
        )
        _close(model)
    header = ("family", "scale, tile", "tiles", "tiles / s", "MP / s", "nuclei / s")
    print_table(f"Nuclei models through the instance engine on {device} (CMU-1-Small-Region)", header, rows)


def overhead_table(quick: bool, device: str) -> None:
    slide = open_slide(CMU)
    rows = []
    for name, model in families(device):
        if model is None:
            continue
        if quick and not isinstance(model, DarkBlobs) and "Cellpose" not in name:
            _close(model)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            region = None if isinstance(model, DarkBlobs) or not quick else (0, 0, 1500, 1500)
            result = segment_instances_slide(slide, model, Path(tmp) / "n.zarr", region=region, batch_size=2)
        s = result.stats
        rows.append(
            (
                name,
                "whole slide" if region is None else "1500 px region",
                f"{s.predicted}/{s.tiles}",
                f"{s.seconds:.1f} s",
                f"{s.model_seconds:.1f} s",
                f"{s.seconds / s.model_seconds:.2f}" if s.model_seconds > 0 else "-",
                f"{result.summary.total:,}",
            )
        )
        _close(model)
    header = ("family", "where", "tiles", "end to end", "model", "ratio", "nuclei")
    print_table(f"Whole-slide nuclei runs on {device}: end to end over model time (CMU-1-Small-Region)", header, rows)


def memory_child(side: int) -> dict:
    from napari_nephro.io.slide import Slide

    slide = Slide(Path(f"virtual-{side}"), VirtualSlideBackend(side))
    before = rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = segment_instances_slide(slide, DarkBlobs(), Path(tmp) / "out.zarr", batch_size=4)
        seconds = time.perf_counter() - t0
    return {
        "tiles": result.stats.tiles,
        "predicted": result.stats.predicted,
        "nuclei": result.summary.total,
        "seconds": seconds,
        "baseline": before,
        "peak": rss_mib(),
    }


def memory_table(quick: bool) -> None:
    rows = []
    for side in [4096, 16384] if quick else [4096, 40960]:
        out = _child(["--memory-child", str(side)])
        rows.append(
            (
                f"{side} x {side} virtual slide, dark blobs",
                f"{out['predicted']}/{out['tiles']}",
                f"{out['nuclei']:,}",
                f"{out['seconds']:.0f} s",
                f"{out['peak']:.0f} MiB",
                f"+{out['peak'] - out['baseline']:.0f} MiB",
            )
        )
    header = ("run", "tiles predicted", "nuclei", "time", "peak RSS", "growth during run")
    print_table("Peak memory of whole-slide nuclei runs (uint32 OME-Zarr at level 0 + table)", header, rows)


def matching_table() -> None:
    from napari_nephro.evaluation.instances import match_instances

    rng = np.random.default_rng(0)
    side, step = 2000, 20  # 100 x 100 discs of radius 7: 10,000 objects
    yy, xx = np.mgrid[:side, :side]
    truth = np.zeros((side, side), np.int32)
    pred = np.zeros_like(truth)
    k = 0
    for cy in range(step // 2, side, step):
        for cx in range(step // 2, side, step):
            k += 1
            y0, x0 = cy - 9, cx - 9
            window = (slice(y0, y0 + 19), slice(x0, x0 + 19))
            d = (yy[window] - cy) ** 2 + (xx[window] - cx) ** 2
            truth[window][d <= 49] = k
            dy, dx = rng.integers(-2, 3, 2)
            pred[window][(yy[window] - cy - dy) ** 2 + (xx[window] - cx - dx) ** 2 <= 49] = k
    rows = []
    t0 = time.perf_counter()
    ours = match_instances(pred, truth, 0.5)
    rows.append(
        ("napari_nephro.evaluation.match_instances", f"{time.perf_counter() - t0:.2f} s", ours.tp, ours.fp, ours.fn)
    )
    try:
        from stardist.matching import matching

        t0 = time.perf_counter()
        theirs = matching(truth, pred, thresh=0.5)
        rows.append(
            ("stardist.matching.matching", f"{time.perf_counter() - t0:.2f} s", theirs.tp, theirs.fp, theirs.fn)
        )
    except ImportError:
        rows.append(("stardist.matching (not installed)", "-", "-", "-", "-"))
    print_table(
        f"Instance matching at IoU 0.5, {k:,} objects in {side} x {side}", ("matcher", "time", "TP", "FP", "FN"), rows
    )


def _close(model) -> None:
    close = getattr(model, "close", None)
    if close is not None:
        close()


def _child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if "--memory-child" in sys.argv:
        print(json.dumps(memory_child(int(sys.argv[sys.argv.index("--memory-child") + 1]))))
        return
    quick, only = "--quick" in sys.argv, option("--only", "all")
    device = option("--device", "cpu")
    if only in ("all", "speed"):
        speed_table(quick, device)
    if only in ("all", "overhead"):
        overhead_table(quick, device)
    if only in ("all", "memory"):
        memory_table(quick)
    if only in ("all", "matching"):
        matching_table()


if __name__ == "__main__":
    main()
