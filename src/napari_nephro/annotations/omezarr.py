"""OME-Zarr (NGFF 0.4) multiscale label images: written tile by tile, read lazily.

Written as zarr format 2 with NGFF 0.4 metadata, the version napari-ome-zarr,
QuPath, Fiji/MoBIE and ome-zarr-py all read; reading also accepts NGFF 0.5 (zarr 3,
metadata under "ome"). The class of each label value is kept the NGFF way, in
`image-label.properties` ({"label-value": 3, "class": "global sclerosis"}), with
its colour in `image-label.colors`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..common.atomic import atomic_output
from ..common.paths import path_problem
from ._write import check_target
from .colors import class_color
from .errors import AnnotationError
from .label_source import LabelSource, pyramid_plan, tiles

NGFF_VERSION = "0.4"


@dataclass
class LabelPyramid:
    """A multiscale label image: level 0 first, lazily read."""

    levels: list  # dask arrays (height, width)
    downsamples: list[float]
    mpp: float | None = None
    classes: dict[int, str] = field(default_factory=dict)
    name: str = "labels"
    run: dict | None = None  # the record of the `nephro segment` run that wrote it, if one did
    slide_downsample: float = 1.0  # slide level-0 pixels per pixel of level 0 here (>1: a run at the model's scale)
    slide_shape: tuple[int, int] | None = None  # the slide's level-0 (height, width), when the file records it

    def unfinished(self) -> str | None:
        """Why this is not a result yet (a run that stopped part way), or None for a finished image."""
        record = self.run
        if record is None or record.get("complete") is True:
            return None
        done, rows = record.get("rows_done"), record.get("rows")
        progress = f"{done} of {rows} rows done" if isinstance(done, int) and isinstance(rows, int) else "unfinished"
        return f"an unfinished `nephro segment` run ({progress})"


RUN_KEY = "napari-nephro-run"  # where `nephro segment` records its progress in a store it writes
PARTIAL = ".partial.zarr"


def refuse_unfinished(pyramid: LabelPyramid, path: Path) -> None:
    """Refuse a run's partial store as a result: scoring or converting it would silently use half a slide."""
    why = pyramid.unfinished()
    if why is None:
        return
    name = path.name
    if name.endswith(PARTIAL):
        base = name[: -len(PARTIAL)]
        name = base if Path(base).suffix.lower() in (".tif", ".tiff", ".geojson") else f"{base}.zarr"
    slide = pyramid.run.get("slide") or "SLIDE"
    raise AnnotationError(
        path, f"{why}: finish it with `nephro segment {slide} ... --out {name} --resume`, then use {name}"
    )


def write_label_zarr(
    source: LabelSource,
    path: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    name: str = "labels",
    chunk: int = 1024,
    smallest: int = 512,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `source` as an OME-Zarr label image, one chunk-sized tile at a time.

    The store is built under a temporary name and renamed into place when complete,
    so an interrupted write never looks like a finished one.
    """
    import zarr

    path = Path(path)
    check_target(path, overwrite)
    levels, progress = pyramid_plan(source.shape, smallest, chunk, progress)
    with atomic_output(path) as tmp:
        group = zarr.open_group(store=str(tmp), mode="w", zarr_format=2)
        for index, (d, shape) in enumerate(levels):
            array = group.create_array(
                str(index), shape=shape, chunks=(min(chunk, shape[0]), min(chunk, shape[1])), dtype=source.dtype
            )
            array.attrs["_ARRAY_DIMENSIONS"] = ["y", "x"]
            for y, x, h, w in tiles(shape, chunk):
                array[y : y + h, x : x + w] = source.tile(d, y, x, h, w)
                progress.tick()
        group.attrs.update(ngff_metadata(name, [d for d, _ in levels], mpp, source.classes))
    return path


def ngff_metadata(name: str, downsamples: list[int], mpp: float | None, classes: dict[int, str]) -> dict:
    """NGFF 0.4 `multiscales` and `image-label` attributes of a label pyramid (scales in um when mpp is known)."""
    unit = {"unit": "micrometer"} if mpp else {}
    step = mpp or 1.0
    datasets = [
        {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [d * step, d * step]}]}
        for i, d in enumerate(downsamples)
    ]
    multiscale = {
        "version": NGFF_VERSION,
        "name": name,
        "axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
        "datasets": datasets,
        "type": "nearest",
    }
    image_label = {
        "version": NGFF_VERSION,
        "colors": [{"label-value": int(v), "rgba": [*class_color(c), 255]} for v, c in classes.items()],
        "properties": [{"label-value": int(v), "class": c} for v, c in classes.items()],
    }
    return {"multiscales": [multiscale], "image-label": image_label}


def read_label_zarr(path: str | os.PathLike[str]) -> LabelPyramid:
    """A label pyramid from an OME-Zarr label image, or from an image whose `labels` group has exactly one."""
    import dask.array as da
    import zarr

    path = Path(path)
    if problem := path_problem(path):
        raise AnnotationError(path, problem)
    try:
        group = zarr.open_group(store=str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a folder that is no store
        raise AnnotationError(path, f"not a zarr store ({exc.__class__.__name__})") from None
    attrs = _ngff(group.attrs.asdict())
    if "multiscales" not in attrs and "labels" in group:
        names = _ngff(group["labels"].attrs.asdict()).get("labels", [])
        if len(names) != 1:
            raise AnnotationError(path, f"holds {len(names)} label images ({', '.join(names)}); open one of them")
        return read_label_zarr(path / "labels" / names[0])
    if "multiscales" not in attrs:
        raise AnnotationError(path, "not an OME-Zarr image: no 'multiscales' metadata")
    multiscale = attrs["multiscales"][0]
    levels, scales = [], []
    for dataset in multiscale["datasets"]:
        levels.append(da.from_zarr(group[dataset["path"]]))
        scale = next((t["scale"] for t in dataset.get("coordinateTransformations", []) if t["type"] == "scale"), None)
        scales.append(float(scale[-1]) if scale else None)
    if any(s != 1 for s in levels[0].shape[:-2]):  # (t, c, z) axes of size 1 are allowed, and dropped
        raise AnnotationError(path, f"a label image must be 2-D (y, x), not shape {levels[0].shape}")
    levels = [level.reshape(level.shape[-2:]) for level in levels]
    if np.dtype(levels[0].dtype).kind not in "ui":
        raise AnnotationError(path, f"label values must be integers, not {levels[0].dtype}")
    if all(scales):
        downsamples = [s / scales[0] for s in scales]
    else:
        downsamples = [levels[0].shape[-1] / level.shape[-1] for level in levels]
    units = {a.get("unit") for a in multiscale.get("axes", [])[-2:]}
    mpp = scales[0] if scales[0] and units == {"micrometer"} else None
    properties = attrs.get("image-label", {}).get("properties", [])
    classes = {int(p["label-value"]): str(p["class"]) for p in properties if "class" in p and "label-value" in p}
    run = attrs.get(RUN_KEY) if isinstance(attrs.get(RUN_KEY), dict) else None
    pyramid = LabelPyramid(levels, downsamples, mpp, classes, multiscale.get("name") or path.stem, run)
    pyramid.slide_downsample, pyramid.slide_shape = run_grid(run)
    return pyramid


def run_grid(record: dict | None) -> tuple[float, tuple[int, int] | None]:
    """(slide level-0 pixels per output pixel, the slide's level-0 shape) from a run record; (1, None) without."""
    try:
        downsample = float(record["plan"]["out_downsample"])
        shape = tuple(int(n) for n in record["slide_shape"])
    except (KeyError, TypeError, ValueError):
        return 1.0, None
    if not (downsample > 0 and np.isfinite(downsample)) or len(shape) != 2:
        return 1.0, None
    return downsample, shape


def _ngff(attrs: dict) -> dict:
    return attrs.get("ome", attrs)  # NGFF 0.5 nests everything under "ome"
