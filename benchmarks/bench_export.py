"""Annotation export benchmarks, printed as a table.

    python benchmarks/bench_export.py

1. the 96 HuBMAP glomeruli (a 13013 x 18484 slide) written as OME-Zarr labels and
   as a pyramidal label TIFF, tile by tile from the polygons: time, and peak memory
   growth against the size of the level-0 raster;
2. reading the OME-Zarr back into polygons (tiled vectorize);
3. a training tile dataset (512 px tiles, 128 overlap) cut from the 42 BUPT images:
   tiles per second.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

from _table import print_table
from napari_nephro.annotations import PolygonLabels, read_annotations, read_geojson, write_label_tiff, write_label_zarr
from napari_nephro.pipelines import export

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HUBMAP_SHAPE = (18484, 13013)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    glomeruli = read_geojson(DATA / "annotations" / "hubmap_aaa6a05cc_glomeruli.geojson")
    raw_mib = HUBMAP_SHAPE[0] * HUBMAP_SHAPE[1] / 2**20  # uint8 level 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, writer, target in (
            ("OME-Zarr labels", write_label_zarr, tmp / "g.zarr"),
            ("label TIFF", write_label_tiff, tmp / "g.tif"),
        ):
            before = rss_mib()
            t0 = time.perf_counter()
            writer(PolygonLabels(glomeruli, HUBMAP_SHAPE), target, mpp=0.5)
            rows.append(
                (
                    f"write {name}",
                    f"{time.perf_counter() - t0:.1f} s",
                    f"+{rss_mib() - before:.0f} MiB",
                    f"{raw_mib:.0f} MiB",
                )
            )
        t0 = time.perf_counter()
        back = read_annotations(tmp / "g.zarr")
        rows.append(("OME-Zarr -> polygons", f"{time.perf_counter() - t0:.1f} s", f"{len(back)} objects", ""))
        bupt = DATA / "glomeruli" / "bupt_multistain_dev"
        t0 = time.perf_counter()
        out = export(bupt / "annotations.json", "tiles", tmp / "tiles", slide=bupt / "images", tile=512, overlap=128)
        seconds = time.perf_counter() - t0
        count = sum(1 for _ in (out[0] / "images").iterdir())
        rows.append(("BUPT tile dataset", f"{seconds:.1f} s", f"{count} tiles", f"{count / seconds:.1f} tiles/s"))
    print_table("Annotation export", ("job", "time", "result / memory", "level-0 raster"), rows)


if __name__ == "__main__":
    sys.exit(main())
