"""Segmentation engine benchmarks, printed as tables.

    python benchmarks/bench_segment.py [--quick] [--device cuda] [--only overhead]

1. glass skipping: share of tiles (1024 px at 1 um/px, 256 overlap: the paper's grid)
   never sent to the model, on the real slides;
2. overhead: end-to-end time of a whole-slide run (plan, read, model, stitch, write
   the OME-Zarr pyramid) over the time of the model's forward passes alone on the
   same tiles, with the paper's U-Net (ResNet-34, 320 px input) on this CPU, with
   the output at the working scale (the default) and at full resolution, and the
   share of the run's time in each stage (`RunStats`);
3. memory: peak resident memory of whole-slide runs on a lazily generated
   60k x 60k slide and on a 6k x 6k one (each in its own process), with a
   pixel-wise model so the engine's own memory shows, and the U-Net's own
   footprint for comparison.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _table import print_table
from napari_nephro.inference import make_plan, segment_slide
from napari_nephro.io import open_slide
from napari_nephro.tiling import read_scaled

DATA = Path(os.environ.get("NEPHRO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
REAL = [
    ("CMU-1-Small-Region.svs", None),
    ("CMU-1-Small-Region-dicom", None),
    ("tcga-cr-7395-01a-01-ts1.svs", 0.25),  # no mpp in the file: a 40x scan assumed
    ("small_HE_levels.tiff", 0.5),
]


def rss_mib() -> float:
    """Peak resident memory of this process so far (VmHWM: unlike ru_maxrss it does not inherit the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def option(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def unet(device: str = "cpu"):
    import torch

    from napari_nephro.models import ModelConfig, TorchSegmenter, build_network

    torch.manual_seed(0)
    config = ModelConfig(arch="unet")  # resnet34, 1024 px tiles at 1 um/px, 256 overlap, 320 input
    return TorchSegmenter(build_network(config), config, device)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def glass_table() -> None:
    rows = []
    for name, mpp in REAL:
        slide = open_slide(DATA / "wsi" / name, mpp=mpp)
        for tile, overlap in ((1024, 256), (512, 128)):
            plan = make_plan(slide, model_mpp=1.0, tile=tile, overlap=overlap)
            share = plan.skipped / len(plan.tiles)
            rows.append((name, f"{tile}/{overlap}", len(plan.tiles), plan.skipped, f"{share:.0%}"))
    print_table("Glass tiles skipped (model at 1 um/px)", ("slide", "tile/overlap", "tiles", "skipped", "share"), rows)


def overhead_table(quick: bool, device: str = "cpu", batch: int = 4) -> None:
    """End-to-end over model-only time of whole-slide runs, written at the working scale (default) and at full
    resolution, and where the end-to-end time went (the stages overlap in threads: shares of the run's time)."""
    from napari_nephro.io.slide import Slide
    from napari_nephro.sample import sample_slide_path

    segmenter = unet(device)
    cmu = open_slide(DATA / "wsi" / "CMU-1-Small-Region.svs")
    with tempfile.TemporaryDirectory() as tmp:  # warm up: imports, first allocations
        segment_slide(cmu, segmenter, Path(tmp) / "warm.zarr", batch_size=batch)
    slides = [("CMU-1-Small-Region.svs", cmu), ("synthetic sample 6144x4096", open_slide(sample_slide_path()))]
    side = 16384 if quick else 32768
    slides.append((f"virtual {side}x{side} at 0.25 um/px", Slide(Path("virtual"), VirtualSlideBackend(side))))
    rows = []
    for name, slide in slides:
        model_only = _model_only(slide, segmenter, device, batch)
        for scale in ("working", "full"):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                result = segment_slide(slide, segmenter, Path(tmp) / "out.zarr", batch_size=batch, out_downsample=scale)
                end_to_end = time.perf_counter() - t0
            shares = result.stats.shares()
            rows.append(
                (
                    name,
                    f"{scale} ({result.mpp:.3g} um/px)",
                    result.stats.predicted,
                    f"{end_to_end:.1f} s",
                    f"{model_only:.1f} s",
                    f"{end_to_end / model_only:.2f}",
                    *(f"{shares[k]:.0%}" for k in ("read", "wait", "model", "stitch", "write", "tail")),
                )
            )
    header = ("slide", "output", "tiles", "end-to-end", "model only", "ratio")
    header += ("read*", "wait", "model", "stitch", "write", "tail")
    title = f"Whole-slide run vs the model's forward passes alone (U-Net R34, {device}, batch {batch})"
    print_table(title, header, rows)
    print(
        "read*: reader threads' busy time (in parallel with the model); wait: the model waiting for tiles; "
        "stitch: blending, resampling, class ids; write: object rules, compression, disk; "
        "tail: after the last batch"
    )


def _model_only(slide, segmenter, device: str, batch: int) -> float:
    """Seconds of the model's forward passes alone over the run's tissue tiles, read beforehand."""
    plan = make_plan(slide, model_mpp=1.0, tile=1024, overlap=256)
    tiles = [read_scaled(slide, plan.level0_box(t), (1024, 1024)) for t in plan.tiles if t.tissue]
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(tiles), batch):
        segmenter.predict(np.stack(tiles[i : i + batch]))
    _sync(device)
    return time.perf_counter() - t0


# -- memory: one process per run ---------------------------------------------------


class VirtualSlideBackend:
    """A lazily generated H&E-like slide: tissue in wide bands, dark round 'nuclei' clusters, 512 px tiles."""

    name, vendor, objective_power, properties, associated_names = "virtual", None, None, {}, []

    def __init__(self, side: int, mpp: float = 0.25) -> None:
        self.level_shapes, self.level_downsamples, self.tile_shapes = [], [], []
        d = 1
        while side // d >= 512:
            self.level_shapes.append((side // d, side // d))
            self.level_downsamples.append(float(d))
            self.tile_shapes.append((512, 512))
            d *= 4
        self.mpp_yx = (mpp, mpp)

    def read_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        h, w = self.level_shapes[level]
        d = self.level_downsamples[level]
        y0, x0 = ty * 512, tx * 512
        yy, xx = np.mgrid[y0 : min(y0 + 512, h), x0 : min(x0 + 512, w)] * d
        tissue = np.sin(yy / 9000) * np.cos(xx / 7000) > 0.2
        dots = (np.sin(yy / 40) * np.sin(xx / 40)) > 0.9
        tile = np.full((*yy.shape, 3), 245, np.uint8)
        tile[tissue] = (225, 160, 200)
        tile[tissue & dots] = (70, 30, 90)
        return tile

    def read_associated(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def close(self) -> None:
        pass


class PixelModel:
    """Foreground where the pixel is dark: costs nothing, so the engine's own memory and time show."""

    kind, classes, fingerprint = "semantic", ["dark"], "pixel"
    mpp, tile_size, input_size, overlap = 1.0, 1024, 1024, 256

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        return ((255 - tiles.mean(axis=-1)) / 255 > 0.5).astype(np.float32)[:, None]


def memory_child(side: int) -> dict:
    from napari_nephro.io.slide import Slide

    slide = Slide(Path(f"virtual-{side}"), VirtualSlideBackend(side))
    before = rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = segment_slide(slide, PixelModel(), Path(tmp) / "out.zarr", batch_size=4, out_downsample="full")
        seconds = time.perf_counter() - t0
    return {
        "tiles": result.stats.tiles,
        "predicted": result.stats.predicted,
        "seconds": seconds,
        "baseline": before,
        "peak": rss_mib(),
        "cache": slide.cache._bytes / 2**20,
    }


def unet_child() -> dict:
    segmenter = unet()
    before = rss_mib()
    segmenter.predict(np.zeros((4, 1024, 1024, 3), np.uint8))
    return {"baseline": before, "peak": rss_mib()}


def memory_table(quick: bool) -> None:
    rows = []
    sides = [6144, 16384] if quick else [6144, 61440]
    for side in sides:
        out = _child(["--memory-child", str(side)])
        rows.append(
            (
                f"{side} x {side} virtual slide, pixel model",
                f"{out['predicted']}/{out['tiles']}",
                f"{out['seconds']:.0f} s",
                f"{out['peak']:.0f} MiB",
                f"+{out['peak'] - out['baseline']:.0f} MiB",
                f"{out['cache']:.0f} MiB",
            )
        )
    out = _child(["--unet-child"])
    growth = f"+{out['peak'] - out['baseline']:.0f} MiB"
    rows.append(("U-Net R34 forward, batch 4 (no slide)", "4", "-", f"{out['peak']:.0f} MiB", growth, "-"))
    header = ("run", "tiles predicted", "time", "peak RSS", "growth during run", "of which tile cache")
    print_table("Peak memory of whole-slide runs (output OME-Zarr at level 0)", header, rows)


def _child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if "--memory-child" in sys.argv:
        print(json.dumps(memory_child(int(sys.argv[sys.argv.index("--memory-child") + 1]))))
        return
    if "--unet-child" in sys.argv:
        print(json.dumps(unet_child()))
        return
    quick, only = "--quick" in sys.argv, option("--only", "all")
    device = option("--device", "cpu")
    if only in ("all", "glass"):
        glass_table()
    if only in ("all", "overhead"):
        overhead_table(quick, device, batch=4 if device == "cpu" else 16)
    if only in ("all", "memory"):
        memory_table(quick)


if __name__ == "__main__":
    main()
