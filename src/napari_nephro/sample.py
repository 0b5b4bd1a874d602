"""The sample slide: four real PAS kidney tiles with their glomeruli annotated, as one pyramidal OME-TIFF.

napari's sample data, `nephro demo` and the docs use it, so the main job runs
offline on real tissue and can say how many of the annotated glomeruli a model
found, not only that it painted something. The tiles come from the AIDPATH
glomeruli set (CC BY 4.0, see sample_data/README.md) and are held out of the
default model's training. They ship in `sample_data/` as JPEG with one GeoJSON of
glomerulus polygons each (made by benchmarks/make_demo_sample.py); the 2x2 mosaic
and its annotations are written once into the cache folder on first use. The
mosaic's seams are tile borders, not tissue.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .common.ome_tiff import write_ome_pyramid

SAMPLE_VERSION = 1  # bump when the shipped tiles or the way the mosaic is written change
SAMPLE_NAME = f"aidpath-kidney-v{SAMPLE_VERSION}"
SAMPLE_TILES = (("10150", "10172"), ("10224", "10177"))  # the mosaic's rows, top to bottom
TILE_SIDE = 1024  # px, each AIDPATH tile
SAMPLE_MPP = 0.5  # micrometres per pixel at level 0 (a 20x Aperio scan)
SAMPLE_SHAPE = (len(SAMPLE_TILES) * TILE_SIDE, len(SAMPLE_TILES[0]) * TILE_SIDE)  # level 0 (height, width)
SAMPLE_LEVELS = 4  # 2048, 1024, 512 and 256 px
SAMPLE_TILE = 256
SAMPLE_CLASS = "glomerulus"
JPEG_QUALITY = 90  # of the shipped tiles and of the mosaic's levels
DATA_DIR = Path(__file__).with_name("sample_data")
ATTRIBUTION = (
    "AIDPATH glomeruli dataset (CC BY 4.0), via sarah-antillia/TensorFlow-FlexUNet-Tiled-Image-Segmentation-Glomeruli "
    "(mini_test): PAS tiles 10150 and 10172 (top), 10224 and 10177 (bottom), 1024 px each at 0.5 um/px. "
    "The seams of the 2x2 mosaic are tile borders."
)


def cache_dir() -> Path:
    """Where generated files live: $NAPARI_NEPHRO_CACHE, else the user cache folder."""
    env = os.environ.get("NAPARI_NEPHRO_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-nephro"))


def sample_tile_names() -> list[str]:
    """The shipped tiles in mosaic order (row by row)."""
    return [name for row in SAMPLE_TILES for name in row]


def sample_slide_path() -> Path:
    """Path of the sample slide, written on first use (under a second)."""
    path = cache_dir() / f"{SAMPLE_NAME}.ome.tif"
    if not path.exists():
        write_sample_mosaic(path)
    return path


def sample_annotations_path() -> Path:
    """Path of the sample slide's glomeruli as QuPath GeoJSON (mosaic pixels), written on first use."""
    from .annotations import write_geojson

    path = cache_dir() / f"{SAMPLE_NAME}.annotations.geojson"
    if not path.exists():
        annotations = sample_annotations()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_geojson(annotations, path, overwrite=True)  # atomic: a second writer at once writes the same
    return path


def sample_annotations():
    """The annotated glomeruli of the shipped tiles, moved to their place in the mosaic (an `AnnotationSet`)."""
    import shapely

    from .annotations import Annotation, AnnotationSet, read_geojson

    found = []
    for (row, col), name in _placed():
        offset = np.array([col * TILE_SIDE, row * TILE_SIDE], np.float64)
        for ann in read_geojson(_shipped(name, ".geojson")):
            geometry = shapely.transform(ann.geometry, lambda xy, d=offset: xy + d)
            found.append(Annotation(geometry, SAMPLE_CLASS, "annotation", {"tile": name}))
    return AnnotationSet(found, classes=[SAMPLE_CLASS])


def sample_mosaic() -> np.ndarray:
    """The four shipped tiles as one (2048, 2048, 3) uint8 image."""
    from PIL import Image

    image = np.zeros((*SAMPLE_SHAPE, 3), np.uint8)
    for (row, col), name in _placed():
        with Image.open(_shipped(name, ".jpg")) as tile:
            pixels = np.asarray(tile.convert("RGB"))
        if pixels.shape != (TILE_SIDE, TILE_SIDE, 3):
            raise OSError(
                f"napari-nephro's sample tile {name}.jpg is {pixels.shape[1]}x{pixels.shape[0]} px, "
                f"not {TILE_SIDE} px square: reinstall the package"
            )
        image[row * TILE_SIDE : (row + 1) * TILE_SIDE, col * TILE_SIDE : (col + 1) * TILE_SIDE] = pixels
    return image


def write_sample_mosaic(path: Path) -> Path:
    """Write the sample slide to `path` atomically (a reader never sees half a file)."""
    image = sample_mosaic()  # read the shipped tiles before anything is created
    write_ome_pyramid(
        path,
        image,
        mpp=SAMPLE_MPP,
        levels=SAMPLE_LEVELS,
        tile=SAMPLE_TILE,
        name="AIDPATH kidney PAS sample",
        description=ATTRIBUTION,
        quality=JPEG_QUALITY,
    )
    return path


def _placed() -> list[tuple[tuple[int, int], str]]:
    return [((r, c), name) for r, row in enumerate(SAMPLE_TILES) for c, name in enumerate(row)]


def _shipped(name: str, suffix: str) -> Path:
    path = DATA_DIR / f"{name}{suffix}"
    if not path.is_file():
        raise FileNotFoundError(f"napari-nephro's sample tile file {path} is missing: reinstall the package")
    return path
