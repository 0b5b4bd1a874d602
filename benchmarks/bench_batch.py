"""Cohort throughput of `nephro batch` on this machine, printed as a table.

    python benchmarks/bench_batch.py [--copies 2] [--model default] [--model nuclei]

The real slides of ../shared/data/wsi (CMU-1 as SVS and as DICOM, the TCGA slide at
0.25 um/px), each listed `--copies` times (under other names, so each is a slide of
its own), go through `pipelines.batch` on a LocalCluster of 1 and then 2 worker
processes. Reported: wall time, slides per hour, the speed-up, and each worker's
peak resident memory (VmHWM, read on the workers at the end). The cluster's start
(processes importing torch) is timed apart: a cohort of hundreds of slides pays it once.
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
import time
from pathlib import Path

from _table import print_table

DATA = Path(os.environ.get("NEPHRO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SLIDES = [("CMU-1-Small-Region.svs", ""), ("CMU-1-Small-Region-dicom", ""), ("tcga-cr-7395-01a-01-ts1.svs", "0.25")]


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def options(name: str) -> list[str]:
    return [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == name and i + 1 < len(sys.argv)]


def slide_list(folder: Path, copies: int) -> Path:
    path = folder / "slides.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "mpp", "name"])
        for k in range(copies):
            for name, mpp in SLIDES:
                writer.writerow([DATA / "wsi" / name, mpp, f"{Path(name).stem}-{k}"])
    return path


def run(workers: int, slides: Path, models: list[str], out: Path) -> tuple[float, float, list[float], int]:
    from distributed import Client

    from napari_nephro.pipelines.batch import batch, local_cluster

    t0 = time.perf_counter()
    cluster = local_cluster(workers, dashboard=False)
    client = Client(cluster)
    client.run(
        lambda: __import__("torch") and __import__("napari_nephro.inference.api")
    )  # imports, as a cohort pays once
    start = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        result = batch(slides, models, out, client=client, device="cpu")
        seconds = time.perf_counter() - t0
        peaks = sorted(client.run(peak_mib).values())
    finally:
        client.close()
        cluster.close()
    if result.failed:
        raise SystemExit(f"slides failed: {result.failed}")
    return start, seconds, peaks, len(result.rows)


def main() -> None:
    copies = int((options("--copies") or ["2"])[0])
    models = options("--model") or ["default"]
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        slides = slide_list(Path(tmp), copies)
        for workers in (1, 2):
            start, seconds, peaks, n = run(workers, slides, models, Path(tmp) / f"out{workers}")
            per_hour = n / seconds * 3600
            base = base or per_hour
            rows.append(
                (
                    workers,
                    n,
                    f"{start:.1f} s",
                    f"{seconds:.1f} s",
                    f"{per_hour:.0f}",
                    f"{per_hour / base:.2f}",
                    " / ".join(f"{p:.0f}" for p in peaks),
                )
            )
    header = ("workers", "slides", "cluster start", "cohort", "slides/hour", "speed-up", "peak MiB per worker")
    print_table(f"nephro batch, {' + '.join(models)}, {os.cpu_count()} cores, CPU", header, rows)


if __name__ == "__main__":
    main()
