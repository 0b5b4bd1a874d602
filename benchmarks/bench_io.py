"""Slide reading benchmarks on the real files in ../shared/data/wsi, printed as ratios.

    python benchmarks/bench_io.py [--repeat 7]

1. open: time to open each file with `open_slide` vs the bare library
   (openslide.OpenSlide or tifffile.TiffFile), median of runs.
2. read overhead: the same tiles read through the dask pyramid vs one
   `openslide.OpenSlide.read_region` call on a fresh handle (target <= 1.10).
3. cache: re-reading the same region through the tile cache vs its first read.
Ratios compare runs made in the same process, minutes apart, on the same files.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
import tifffile

from _table import print_table
from napari_nephro import open_slide

WSI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wsi"
OPEN_FILES = [
    "CMU-1-Small-Region.svs",
    "tcga-cr-7395-01a-01-ts1.svs",
    "CMU-1-Small-Region-dicom",
    "small_HE_levels.tiff",
]
# (file, level, tile-aligned region x, y, w, h): a screenful of tiles from each real slide
READS = [
    ("CMU-1-Small-Region.svs", 0, (240, 480, 1920, 1920)),
    ("tcga-cr-7395-01a-01-ts1.svs", 0, (512, 512, 2048, 2048)),
    ("CMU-1-Small-Region-dicom", 0, (240, 480, 1920, 1920)),
]


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bare_open(path: Path) -> None:
    if path.is_dir() or openslide.OpenSlide.detect_format(str(path)) not in (None, "generic-tiff"):
        target = max(path.glob("*.dcm"), key=lambda p: p.stat().st_size) if path.is_dir() else path
        openslide.OpenSlide(str(target)).close()
    else:
        with tifffile.TiffFile(path) as tif:
            _ = tif.series[0].levels


def bench_open(repeat: int) -> list[tuple]:
    rows = []
    for name in OPEN_FILES:
        path = WSI / name
        ours = median_time(lambda p=path: open_slide(p).close(), repeat)
        bare = median_time(lambda p=path: bare_open(p), repeat)
        rows.append((name, f"{ours * 1e3:.1f} ms", f"{bare * 1e3:.1f} ms", f"{ours / bare:.2f}"))
    return rows


def write_large_pyramid(path: Path, shape: tuple[int, int] = (32768, 49152), levels: int = 5) -> Path:
    """A slide of real-scan size (16 x 25 mm at 0.5 um/px) written tile by tile from one tile."""
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    tmp = path.with_suffix(".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        h, w = shape
        for i in range(levels):
            count = -(-h // 256) * -(-w // 256)
            tif.write(
                (tile for _ in range(count)),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                compressionargs={"level": 1},
                subfiletype=1 if i else 0,
                resolution=(2e4 / 2**i, 2e4 / 2**i),
                resolutionunit="CENTIMETER",
            )
            h, w = h // 2, w // 2
    tmp.rename(path)
    return path


def bench_large(repeat: int, folder: Path) -> list[tuple]:
    small = write_large_pyramid(folder / "small-6144x4096.tif", (4096, 6144), levels=3)
    large = write_large_pyramid(folder / "large-49152x32768.tif")
    rows = []
    for path in (small, large):
        t_open = median_time(lambda p=path: open_slide(p).close(), repeat)
        slide = open_slide(path)
        h, w = slide.level_shapes[0]
        y, x = h // 2, w // 2
        view = lambda s=slide, y=y, x=x: s.levels[0][y : y + 1024, x : x + 1024].compute()  # noqa: E731
        t_view = median_time(view, repeat)
        rows.append(
            (path.name, f"{w}x{h}", slide.levels[0].npartitions, f"{t_open * 1e3:.1f} ms", f"{t_view * 1e3:.1f} ms")
        )
    base_open = float(rows[0][3].split()[0])
    base_view = float(rows[0][4].split()[0])
    rows[1] = (
        *rows[1],
        f"{float(rows[1][3].split()[0]) / base_open:.2f}",
        f"{float(rows[1][4].split()[0]) / base_view:.2f}",
    )
    rows[0] = (*rows[0], "1.00", "1.00")
    return rows


def bench_read(repeat: int) -> list[tuple]:
    rows = []
    for name, level, (x, y, w, h) in READS:
        path = WSI / name
        target = max(path.glob("*.dcm"), key=lambda p: p.stat().st_size) if path.is_dir() else path

        def direct(target=target, level=level, box=(x, y, w, h)):
            with openslide.OpenSlide(str(target)) as osr:  # fresh handle: its own tile cache is cold
                ds = osr.level_downsamples[level]
                return np.asarray(osr.read_region((round(box[0] * ds), round(box[1] * ds)), level, box[2:]))[..., :3]

        def pyramid(path=path, level=level, box=(x, y, w, h)):
            with open_slide(path) as slide:  # fresh Slide: empty tile cache
                bx, by, bw, bh = box
                return slide.levels[level][by : by + bh, bx : bx + bw].compute()

        np.testing.assert_array_equal(direct(), pyramid())  # the same pixels, or the timing means nothing
        t_direct, t_pyramid = [], []
        for _ in range(repeat):  # interleaved, so drift in the machine hits both alike
            t_direct.append(median_time(direct, 1))
            t_pyramid.append(median_time(pyramid, 1))
        td, tp = statistics.median(t_direct), statistics.median(t_pyramid)

        slide = open_slide(path)
        region = slide.levels[level][y : y + h, x : x + w]
        t0 = time.perf_counter()
        region.compute()
        first = time.perf_counter() - t0
        again = median_time(region.compute, repeat)
        tiles = len(slide.cache)
        rows.append(
            (
                name,
                f"{w}x{h} ({tiles} tiles)",
                f"{td * 1e3:.0f} ms",
                f"{tp * 1e3:.0f} ms",
                f"{tp / td:.2f}",
                f"{first * 1e3:.0f} ms",
                f"{again * 1e3:.1f} ms",
                f"{again / first:.3f}",
            )
        )
        slide.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    if not WSI.exists():
        print(f"benchmark data not found at {WSI}", file=sys.stderr)
        return 2
    print_table("Open time (median)", ("file", "open_slide", "bare library", "ratio"), bench_open(args.repeat))
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print_table(
            "Size independence: open and a cached 1024x1024 view, 6144x4096 vs 49152x32768 (same writer)",
            ("file", "level 0", "chunks", "open", "view", "open ratio", "view ratio"),
            bench_large(args.repeat, Path(folder)),
        )
    print_table(
        "Reading the same tiles (median; fresh handles each run)",
        ("file", "region", "read_region", "dask pyramid", "ratio", "first read", "cached re-read", "ratio"),
        bench_read(args.repeat),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
