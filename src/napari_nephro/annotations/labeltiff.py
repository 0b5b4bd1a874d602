"""Label TIFFs: tiled, deflate-compressed, with a pyramid in SubIFDs and the classes in the description.

Any TIFF reader sees a plain integer image (level 0 first); napari-nephro also reads
back the class of each label value and the pixel size, which it writes as JSON under
the "napari-nephro" key of the ImageDescription and as resolution tags.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from ..common.atomic import atomic_output
from ._write import check_target
from .errors import AnnotationError
from .label_source import LabelSource, pyramid_plan, tiles

DESCRIPTION_KEY = "napari-nephro"


def write_label_tiff(
    source: LabelSource,
    path: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    tile: int = 512,
    smallest: int = 512,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    run: dict | None = None,
) -> Path:
    """Write `source` tile by tile to a temporary file, renamed into place when complete.

    `run`: the record of the segmentation run that made it (its slide's shape and
    the output's scale), kept in the description so readers place it on the slide."""
    import tifffile

    path = Path(path)
    check_target(path, overwrite)
    levels, progress = pyramid_plan(source.shape, smallest, tile, progress)

    def level_tiles(d: int, shape: tuple[int, int]):
        for y, x, h, w in tiles(shape, tile):
            yield source.tile(d, y, x, h, w)
            progress.tick()

    info = {"classes": {str(k): v for k, v in source.classes.items()}, "mpp": mpp}
    if run is not None:
        info["run"] = run
    description = {DESCRIPTION_KEY: info}
    options = {"tile": (tile, tile), "compression": "zlib", "metadata": None, "dtype": source.dtype}
    with atomic_output(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=_needs_bigtiff(source, levels)) as tw:
        for index, (d, shape) in enumerate(levels):
            if mpp:
                options.update(resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)), resolutionunit="CENTIMETER")
            if index == 0:
                extra = {"description": json.dumps(description), "subifds": len(levels) - 1}
            else:
                extra = {"subfiletype": 1}
            tw.write(level_tiles(d, shape), shape=shape, **options, **extra)
    return path


def _needs_bigtiff(source: LabelSource, levels) -> bool:
    raw = sum(h * w for _, (h, w) in levels) * source.dtype.itemsize
    return raw > 2**31  # compressed it is usually far smaller, but a 4 GB overflow must never happen mid-write


def is_label_tiff(path: str | os.PathLike[str]) -> bool:
    """Whether `write_label_tiff` wrote this file (so it holds labels, not a slide)."""
    description = _description(path)
    return description is not None and description_info(description) is not None


def _description(path) -> str | None:
    import tifffile

    if Path(path).suffix.lower() not in (".tif", ".tiff") or not Path(path).is_file():
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            return tif.pages[0].description
    except (tifffile.TiffFileError, OSError, ValueError):
        return None


def description_info(description: str) -> tuple[dict[int, str], float | None] | None:
    """Classes (label value -> name) and mpp from an ImageDescription `write_label_tiff` wrote, else None."""
    try:
        info = json.loads(description)[DESCRIPTION_KEY]
        return {int(k): str(v) for k, v in info.get("classes", {}).items()}, info.get("mpp")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # another program's description
        return None


def description_run(description: str | None) -> dict | None:
    """The run record an ImageDescription `write_label_tiff(..., run=)` wrote keeps, else None."""
    try:
        run = json.loads(description)[DESCRIPTION_KEY].get("run")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # no description, or another's
        return None
    return run if isinstance(run, dict) else None


def read_label_tiff_info(path: str | os.PathLike[str]) -> tuple[dict[int, str], float | None]:
    """Classes and mpp written by `write_label_tiff`; ({}, None) for other TIFFs."""
    description = _description(path)
    return (description_info(description) if description is not None else None) or ({}, None)


def read_label_tiff_run(path: str | os.PathLike[str]) -> dict | None:
    """The run record `write_label_tiff(..., run=)` kept, or None."""
    return description_run(_description(path))


def read_label_tiff_pyramid(path: str | os.PathLike[str]):
    """The levels of a label TIFF as lazy dask arrays, with its classes, pixel size and run record."""
    import dask.array as da
    import tifffile
    import zarr

    from .omezarr import LabelPyramid, run_grid

    description = _description(path)
    classes, mpp = (description_info(description) if description is not None else None) or ({}, None)
    run = description_run(description)
    try:
        store = tifffile.imread(path, aszarr=True)
        group = zarr.open(store, mode="r")
    except (tifffile.TiffFileError, OSError, ValueError) as exc:
        raise AnnotationError(path, f"not a readable label TIFF ({exc})") from None
    arrays = [group] if isinstance(group, zarr.Array) else [group[k] for k in sorted(group.array_keys(), key=int)]
    levels = [da.from_zarr(a) for a in arrays]
    downsamples = [levels[0].shape[-1] / level.shape[-1] for level in levels]
    pyramid = LabelPyramid(levels, downsamples, mpp, classes, Path(path).stem, run)
    pyramid.slide_downsample, pyramid.slide_shape = run_grid(run)
    return pyramid
