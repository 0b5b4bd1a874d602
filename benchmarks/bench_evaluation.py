"""Evaluation benchmarks, printed as a table.

    python benchmarks/bench_evaluation.py [--side 50000]

1. instance matching on 1k / 10k / 50k objects (each object moved by one pixel), vs
   stardist.matching.matching when stardist is installed (ratio; target <= 1.0);
2. blockwise Dice on a SIDE x SIDE dask mask built lazily: time and peak memory
   (resident set size growth), against the size of the mask if it were in memory.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import dask.array as da
import numpy as np
from scipy import ndimage

from _table import print_table
from napari_nephro.evaluation import match_instances, pixel_scores


def grid_of_objects(count: int) -> np.ndarray:
    side = int(np.ceil(np.sqrt(count)))
    cell = np.pad(np.ones((6, 6), np.uint8), 2)
    labels, _ = ndimage.label(np.kron(np.ones((side, side), np.uint8), cell))
    labels[labels > count] = 0
    return labels


def bench_matching() -> list[tuple]:
    try:
        from stardist.matching import matching
    except ImportError:
        matching = None
    rows = []
    for count in (1_000, 10_000, 50_000):
        truth = grid_of_objects(count)
        pred = np.roll(truth, 1, axis=1)
        t0 = time.perf_counter()
        ours = match_instances(pred, truth, 0.5)
        t_ours = time.perf_counter() - t0
        ratio = "stardist not installed"
        if matching is not None and count > 10_000:
            ratio = "stardist skipped: dense overlap matrix needs 20 GB"
        elif matching is not None:
            t0 = time.perf_counter()
            ref = matching(truth, pred, thresh=0.5)
            t_ref = time.perf_counter() - t0
            assert ref.tp == ours.tp
            ratio = f"{t_ours / t_ref:.2f}"
        rows.append((f"{count:,}", f"{truth.shape[1]}x{truth.shape[0]}", ours.tp, f"{t_ours:.2f} s", ratio))
    return rows


def bench_blockwise(side: int) -> list[tuple]:
    def disc_block(block_id=None, block_info=None):
        loc = block_info[None]["array-location"]
        yy, xx = np.ogrid[loc[0][0] : loc[0][1], loc[1][0] : loc[1][1]]
        return ((yy % 1000 - 500) ** 2 + (xx % 1000 - 500) ** 2 < 300**2).astype(np.uint8)

    truth = da.map_blocks(disc_block, dtype=np.uint8, chunks=da.core.normalize_chunks(4096, (side, side)))
    pred = da.roll(truth, 5, axis=1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    scores = pixel_scores(pred, truth)
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    in_memory = side * side * 2 / 2**20  # two uint8 masks
    return [
        (
            f"{side}x{side}",
            f"{scores.dice:.4f}",
            f"{elapsed:.1f} s",
            f"{max(peak - before, 0):.0f} MiB",
            f"{in_memory:,.0f} MiB",
            f"{max(peak - before, 1) / in_memory:.3f}",
        )
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=50_000)
    args = parser.parse_args(argv)
    print_table(
        "Instance matching (IoU 0.5)",
        ("objects", "image", "TP", "napari-nephro", "ratio to stardist"),
        bench_matching(),
    )
    print_table(
        "Blockwise Dice on a lazy mask",
        ("mask", "Dice", "time", "peak RSS growth", "masks in memory", "ratio"),
        bench_blockwise(args.side),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
