"""(Re)create the package's sample tiles, src/napari_nephro/sample_data/, from ../shared/data.

    python benchmarks/make_demo_sample.py [--data ../shared/data]

The four AIDPATH PAS tiles of the sample slide (CC BY 4.0; held out of the default
model's training) are stored as JPEG (quality 90, full colour resolution: 1.6 MB in all) and
their red-on-black glomerulus masks as one GeoJSON of polygons per tile, in tile
pixels, vectorised by the package's own annotations module. Components smaller
than a glomerulus can be (2000 µm²) are left out, as the demo leaves them out of
its predictions. The sample slide itself (the 2x2 mosaic) is built from these
files on first use, in the user's cache folder (`napari_nephro.sample`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from PIL import Image

from napari_nephro.annotations import Annotation, AnnotationSet, read_annotations, write_geojson
from napari_nephro.common.atomic import atomic_output
from napari_nephro.models.object_rules import ObjectRules
from napari_nephro.sample import DATA_DIR, JPEG_QUALITY, SAMPLE_CLASS, SAMPLE_MPP, TILE_SIDE, sample_tile_names

DEFAULT_DATA = Path(os.environ.get("NEPHRO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SIMPLIFY_PX = 0.5  # the masks' pixel staircase becomes straight edges within half a pixel: a tenth of the vertices

MIN_AREA_UM2 = ObjectRules().min_area_um2  # a piece the default model would keep as a glomerulus


def tile_annotations(mask: Path) -> AnnotationSet:
    """The glomeruli of one mask: its connected components of glomerulus size, as polygons in tile pixels."""
    min_px = MIN_AREA_UM2 / SAMPLE_MPP**2
    found = []
    for ann in read_annotations(mask):  # a one-colour mask: one object per connected component
        if ann.area >= min_px:
            geometry = ann.geometry.simplify(SIMPLIFY_PX, preserve_topology=True)
            found.append(Annotation(geometry, SAMPLE_CLASS, "annotation"))
    return AnnotationSet(found, classes=[SAMPLE_CLASS])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (../shared/data)")
    args = parser.parse_args(argv)
    source = args.data / "glomeruli" / "aidpath_pas"
    names = sample_tile_names()
    missing = [
        p for n in names for p in (source / "images" / f"{n}.png", source / "masks" / f"{n}.png") if not p.exists()
    ]
    if missing:
        print(f"make_demo_sample: error: {missing[0]} not found (give --data)", file=sys.stderr)
        return 2
    DATA_DIR.mkdir(exist_ok=True)
    for name in names:
        with Image.open(source / "images" / f"{name}.png") as im:
            image = im.convert("RGB")
        if image.size != (TILE_SIDE, TILE_SIDE):
            print(f"make_demo_sample: error: {name}.png is not {TILE_SIDE} px square", file=sys.stderr)
            return 2
        jpeg = DATA_DIR / f"{name}.jpg"
        with atomic_output(jpeg) as tmp:
            image.save(
                tmp, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=True
            )  # 4:4:4: stains differ in colour detail
        annotations = tile_annotations(source / "masks" / f"{name}.png")
        write_geojson(annotations, DATA_DIR / f"{name}.geojson", overwrite=True)
        print(f"{name}: {len(annotations)} glomeruli, {jpeg.stat().st_size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
