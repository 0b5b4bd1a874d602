"""`nephro batch`: a cohort of slides through one or more models on a dask cluster, with a report per biopsy."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def add_parser(sub, positive) -> None:
    """The `batch` command on the main parser's subparsers."""
    b = sub.add_parser(
        "batch",
        help="segment a folder or list of slides on a dask cluster (local or remote), with a report per biopsy",
    )
    b.add_argument("slides", help="a folder of slides, a CSV with a 'slide' column (and 'mpp', 'name'), or one slide")
    b.add_argument(
        "--model",
        action="append",
        required=True,
        help="as for nephro segment (default, a checkpoint folder, nuclei, cellpose:..., stardist, cellvit:...); "
        "repeat for several: the first glomerulus and the first nuclei model make the report",
    )
    b.add_argument(
        "--out", required=True, type=Path, help="cohort folder: one sub-folder per slide, cohort.csv, index.html"
    )
    where = b.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler", help="address of a running dask scheduler (tcp://HOST:8786); default: this machine"
    )
    where.add_argument("--workers", type=int, help="worker processes on this machine (default: half the cores, 1 to 2)")
    b.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps, on each worker")
    b.add_argument(
        "--out-scale",
        choices=("working", "full"),
        default="working",
        help="label images at the model's working scale (default: the run spends its time in the model) or at "
        "the slide's full resolution",
    )
    b.set_defaults(func=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .pipelines.batch import batch

    bar = None
    tiles: dict[str, str] = {}

    def progress(done: int, total: int, event: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="batch", unit="slide", file=sys.stderr, leave=False, disable=None)
        bar.update(done - bar.n)
        if "done" in event:
            tiles[event["slide"]] = f"{event['model']} {event['done']}/{event['total']} tiles"
        elif event.get("finished"):
            tiles.pop(event["slide"], None)
        bar.set_postfix_str("; ".join(f"{k}: {v}" for k, v in list(tiles.items())[-2:]), refresh=False)

    def dashboard(link: str) -> None:
        print(f"nephro: dask dashboard at {link}", file=sys.stderr, flush=True)

    try:
        result = batch(
            args.slides,
            args.model,
            args.out,
            scheduler=args.scheduler,
            workers=args.workers,
            device=args.device,
            out_scale=args.out_scale,
            progress=progress,
            on_dashboard=dashboard,
        )
    finally:
        if bar is not None:
            bar.close()
    statuses = Counter(run.get("status", "?") for run in result.runs)
    done = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
    print(f"{result.csv}  ({len(result.rows)} slides; runs: {done})")
    print(f"{result.index}")
    for row in result.failed:
        print(f"nephro: {row['slide']}: {row['error']}", file=sys.stderr)
    if result.failed:
        print(f"nephro: {len(result.failed)} of {len(result.rows)} slides failed (see above)", file=sys.stderr)
        return 1
    return 0
