"""Convert annotations between the formats users exchange, and cut training tile datasets.

An input is one annotation file (GeoJSON, COCO with one or many images, ImageScope /
ASAP XML, label TIFF / PNG, OME-Zarr labels) or a folder of them. The slide (or a
folder of images matched by file stem) gives what vector files lack: the image size
for rasters and COCO, the pixel size, and the pixels for a tile dataset.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..annotations import (
    AnnotationSet,
    ArrayLabels,
    PolygonLabels,
    rasterize,
    read_annotations,
    write_coco,
    write_geojson,
    write_imagescope_xml,
    write_label_tiff,
    write_label_zarr,
)
from ..annotations._json import is_coco, load_json
from ..annotations.coco import coco_from_data
from ..annotations.io import LABEL_IMAGE_EXTENSIONS, LabelFile, image_stem, read_label_file
from ..annotations.model import reading_notes, require_inside
from ..common.atomic import atomic_output
from ..common.limits import mpp_problem, tile_problem
from ..common.paths import path_problem
from ..io import SLIDE_EXTENSIONS, Slide, can_open, open_slide
from ..tiling import read_scaled, tile_grid, tissue_fraction

FORMATS = {"geojson": ".geojson", "coco": ".json", "xml": ".xml", "tiff": ".tif", "zarr": ".zarr", "tiles": ""}
VECTOR_SUFFIXES = (".geojson", ".json", ".xml")
KEEP = ("tissue", "objects", "all")
MIN_TISSUE = 0.1
PNG_LEVEL = 1  # fast zlib: tiles are written once and read many times; level 6 costs 3x the time for ~10% size


class ExportError(Exception):
    """A user mistake in what to export: one line."""


@dataclass
class Item:
    """The annotations of one image, with what is known about that image."""

    name: str  # file stem, used to match images and to name outputs
    annotations: AnnotationSet | None = None  # vector sources
    raster: LabelFile | None = None  # raster sources
    shape: tuple[int, int] | None = None
    mpp: float | None = None
    image: Path | None = None
    source: Path | None = None  # the annotation file
    file_name: str | None = None  # as a COCO file named the image

    def vectors(self) -> AnnotationSet:
        if self.annotations is None:
            self.annotations = self.raster.annotations()
        return self.annotations


def load_items(
    source: str | os.PathLike[str],
    slide: str | os.PathLike[str] | None = None,
    *,
    on_note: Callable[[str], None] | None = None,
) -> list[Item]:
    """Every image's annotations in a file or folder, each matched with its image when `slide` is given.

    What reading repaired or skipped (a feature without geometry, a polygon made
    valid) goes to `on_note`, a few lines per file.
    """
    source = Path(source)
    if problem := path_problem(source):
        raise ExportError(f"{source}: {problem}")
    if source.is_dir() and source.suffix.lower() != ".zarr":
        files = sorted(p for p in source.iterdir() if _is_annotation_file(p))
        if not files:
            raise ExportError(f"{source}: no annotation files in this folder (GeoJSON, COCO, XML, label images)")
        items = [item for f in files for item in _items_of(f)]
    else:
        items = _items_of(source)
    if on_note is not None:
        for item in items:
            if item.annotations is not None:
                where = f"{item.source} ({item.file_name})" if item.file_name else str(item.source)
                for note in reading_notes(where, item.annotations.warnings):
                    on_note(note)
    names = [i.name for i in items]
    if len(set(names)) != len(names):
        raise ExportError(f"{source}: several images share a file stem; each output is named after it")
    if slide is not None:
        _attach_images(items, Path(slide))
    for item in items:
        if item.annotations is not None and item.shape is not None:
            require_inside(item.annotations, item.shape, item.source)
    return items


def _is_annotation_file(path: Path) -> bool:
    suffix = path.suffix.lower()
    return not path.name.startswith(".") and (suffix in VECTOR_SUFFIXES + LABEL_IMAGE_EXTENSIONS or suffix == ".zarr")


def _items_of(path: Path) -> list[Item]:
    items = _read_items(path)
    for item in items:
        item.source = path.resolve()
    return items


def _read_items(path: Path) -> list[Item]:
    suffix = path.suffix.lower()
    if suffix == ".zarr" or suffix in LABEL_IMAGE_EXTENSIONS:
        raster = read_label_file(path)
        if raster.slide_shape is not None:  # a run at the model's scale: the item is its slide, in level-0 pixels
            mpp = raster.mpp / raster.downsample if raster.mpp else None
            return [Item(path.stem, raster=raster, shape=raster.slide_shape, mpp=mpp)]
        return [Item(path.stem, raster=raster, shape=tuple(raster.labels.shape), mpp=raster.mpp)]
    if suffix == ".json":
        data = load_json(path)
        if is_coco(data):
            images = coco_from_data(data, path)
            return [
                Item(im.stem, annotations=im.annotations, shape=(im.height, im.width), file_name=im.file_name)
                for im in images.values()
            ]
    mpp = None
    if suffix == ".xml":  # ImageScope records the pixel size it drew at: a plain PNG beside it then has one
        from ..annotations.imagescope import read_imagescope_mpp

        mpp = read_imagescope_mpp(path)
    return [Item(path.stem, annotations=read_annotations(path), mpp=mpp)]


def _attach_images(items: list[Item], slide: Path) -> None:
    if not slide.exists():
        raise ExportError(f"{slide}: no such slide, image or folder")
    if slide.is_file() or can_open(slide):  # a file, or a folder that is one slide (DICOM, MIRAX)
        if len(items) != 1:
            raise ExportError(f"{slide}: one slide for {len(items)} images; give a folder of images named by stem")
        items[0].image = slide
    else:
        files = [p for p in slide.iterdir() if p.suffix.lower() in SLIDE_EXTENSIONS]
        for item in items:
            images = {p.stem: p for p in files if p.resolve() != item.source}  # a label TIFF is not its own image
            item.image = images.get(item.name) or images.get(image_stem(item.name))
        missing = [i.name for i in items if i.image is None]
        if len(missing) == len(items):
            raise ExportError(f"{slide}: no image here has the stem of an annotated image (e.g. {missing[0]!r})")
    for item in items:
        if item.image is not None:
            with open_slide(item.image) as opened:
                _check_size(item, opened)
                item.shape = opened.level_shapes[0]
                item.mpp = opened.mpp or item.mpp


def _check_size(item: Item, slide: Slide) -> None:
    if item.shape is not None and tuple(item.shape) != tuple(slide.level_shapes[0]):
        h, w = item.shape
        sh, sw = slide.level_shapes[0]
        raise ExportError(f"{item.name}: the annotations are for a {w}x{h} image but {slide.path.name} is {sw}x{sh}")


def export(
    source: str | os.PathLike[str],
    to: str,
    out: str | os.PathLike[str],
    *,
    slide: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    tile: int = 1024,
    overlap: int = 256,
    mpp: float | None = None,
    keep: str = "tissue",
    values: str = "class",
    progress: Callable[[int, int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    image_mpp: float | None = None,
) -> list[Path]:
    """Convert `source` to format `to` under `out`; returns the files written.

    What reading the input repaired or skipped is passed, line by line, to `on_note`.
    `image_mpp` is the pixel size of images that do not say (plain PNG / JPEG), so
    they can be cut at `mpp`; a file's own pixel size wins.
    """
    if to not in FORMATS:
        raise ExportError(f"unknown format {to!r}: choose one of {', '.join(FORMATS)}")
    if image_mpp is not None and (problem := mpp_problem(image_mpp, "images")):
        raise ExportError(problem)
    items = load_items(source, slide, on_note=on_note)
    for item in items:
        item.mpp = item.mpp or image_mpp
    out = Path(out)
    if to == "tiles":
        return [
            export_tile_dataset(
                items,
                out,
                tile=tile,
                overlap=overlap,
                mpp=mpp,
                keep=keep,
                values=values,
                overwrite=overwrite,
                progress=progress,
            )
        ]
    if to == "coco":
        return [_write_coco(items, out, overwrite)]
    targets = _targets(items, out, FORMATS[to])
    written = []
    for item, target in zip(items, targets, strict=True):
        written.append(_write_one(item, to, target, overwrite, progress))
    return written


def _targets(items: list[Item], out: Path, suffix: str) -> list[Path]:
    """One image: `out` is the file. Several: `out` is a folder (created) with one file per image."""
    if len(items) == 1 and not out.is_dir():
        if out.suffix.lower() != suffix and not (suffix == ".tif" and out.suffix.lower() == ".tiff"):
            raise ExportError(f"{out}: this format is written to a {suffix} file")
        return [out]
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: {len(items)} images need a folder to write to, this is a file")
    out.mkdir(parents=True, exist_ok=True)
    return [out / f"{item.name}{suffix}" for item in items]


def _write_one(item: Item, to: str, target: Path, overwrite: bool, progress) -> Path:
    if to == "geojson":
        return write_geojson(item.vectors(), target, overwrite=overwrite)
    if to == "xml":
        return write_imagescope_xml(item.vectors(), target, mpp=item.mpp, overwrite=overwrite)
    mpp, extra = item.mpp, {}
    if item.raster is not None:
        source = ArrayLabels(item.raster.labels, item.raster.classes)
        d = item.raster.downsample
        if item.raster.slide_shape is not None and d != 1:  # stays at its own scale, still placed on the slide
            mpp = item.mpp * d if item.mpp else None
            if to == "tiff":
                extra["run"] = {"slide_shape": list(item.raster.slide_shape), "plan": {"out_downsample": d}}
    else:
        if item.shape is None:
            raise ExportError(f"{item.name}: polygons need the image size to become a label image: give --slide")
        source = PolygonLabels(item.annotations, item.shape)
    writer = write_label_tiff if to == "tiff" else write_label_zarr
    return writer(source, target, mpp=mpp, overwrite=overwrite, progress=progress, **extra)


def _write_coco(items: list[Item], out: Path, overwrite: bool) -> Path:
    images = {}
    for item in items:
        if item.shape is None:
            raise ExportError(f"{item.name}: COCO records each image's size: give --slide")
        file_name = item.file_name or (item.image.name if item.image is not None else f"{item.name}.png")
        images[file_name] = (item.vectors(), item.shape)
    return write_coco(images, out, overwrite=overwrite)


def export_tile_dataset(
    items: list[Item],
    out: Path,
    *,
    tile: int = 1024,
    overlap: int = 256,
    mpp: float | None = None,
    keep: str = "tissue",
    values: str = "class",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Image tiles (PNG) and mask tiles (PNG of class or instance ids) in `out/images` and `out/masks`.

    Tiles are cut at `mpp` (the slide's own when None) on an overlapping grid, read
    from the nearest pyramid level; masks are drawn from the polygons at that exact
    scale, not resized. `tiles.csv` says where each tile came from; `dataset.json`
    records the classes (mask value -> name) and the settings.
    """
    if keep not in KEEP:
        raise ExportError(f"keep must be one of {', '.join(KEEP)}, not {keep!r}")
    if values not in ("class", "instance"):
        raise ExportError(f"values must be 'class' or 'instance', not {values!r}")
    if tile <= 0 or not 0 <= overlap < tile:
        raise ExportError(f"tile must be positive and overlap smaller than the tile (tile {tile}, overlap {overlap})")
    problem = tile_problem(tile) or (mpp_problem(mpp) if mpp is not None else None)
    if problem:
        raise ExportError(problem)
    missing = [i.name for i in items if i.image is None]
    if missing:
        raise ExportError(f"a tile dataset needs the images: none found for {', '.join(missing[:3])} (give --slide)")
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; pass --overwrite to replace it")
    classes = list(dict.fromkeys(c for item in items for c in item.vectors().classes))
    plans = [(item, *_grid(item, tile, overlap, mpp)) for item in items]
    total, done = sum(len(grid) for _, grid, _ in plans), 0
    with atomic_output(out) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        rows = []
        for item, grid, scale in plans:
            annotations = _with_classes(item.vectors(), classes)
            with open_slide(item.image) as slide:
                for t in grid:
                    row = _cut(slide, annotations, item, t, tile, scale, keep, values, tmp)
                    if row is not None:
                        rows.append(row)
                    done += 1
                    if progress is not None:
                        progress(done, total)
        _write_index(tmp, rows, classes, values, tile, overlap, mpp, items)
    return out


def _grid(item: Item, tile: int, overlap: int, mpp: float | None):
    if mpp is not None and item.mpp is None:
        raise ExportError(f"{item.name}: the image's pixel size is unknown, so it cannot be cut at {mpp} um/px")
    scale = mpp / item.mpp if mpp is not None else 1.0
    h, w = item.shape
    return tile_grid((0, 0, w, h), tile=tile, overlap=overlap, scale=scale), scale


def _with_classes(annotations: AnnotationSet, classes: list[str]) -> AnnotationSet:
    """The same objects with the dataset's class order, so a class id means one class in every mask."""
    return AnnotationSet(annotations.annotations, classes=classes)


def _cut(slide, annotations, item, t, tile, scale, keep, values, folder: Path) -> dict | None:
    mask = rasterize(annotations, (tile, tile), downsample=scale, origin=(t.x, t.y), values=values)
    if keep == "objects" and not mask.any():
        return None
    image = read_scaled(slide, t.box, (tile, tile))
    tissue = tissue_fraction(image)
    if keep == "tissue" and tissue < MIN_TISSUE and not mask.any():
        return None
    name = f"{item.name}_x{round(t.x)}_y{round(t.y)}.png"
    Image.fromarray(image).save(folder / "images" / name, compress_level=PNG_LEVEL)
    _save_mask(mask, folder / "masks" / name)
    ids = np.unique(mask)
    return {
        "image": f"images/{name}",
        "mask": f"masks/{name}",
        "source": item.image.name,
        "x": round(t.x, 2),
        "y": round(t.y, 2),
        "size_level0": round(t.w, 2),
        "tissue": round(tissue, 3),
        "foreground": round(float(np.mean(mask > 0)), 4),
        "values": " ".join(str(v) for v in ids if v),
    }


def _save_mask(mask: np.ndarray, path: Path) -> None:
    if mask.max() < 256:
        Image.fromarray(mask.astype(np.uint8)).save(path, compress_level=PNG_LEVEL)
    elif mask.max() < 65536:
        Image.fromarray(mask.astype(np.uint16)).save(path, compress_level=PNG_LEVEL)
    else:
        raise ExportError(f"{path.name}: more than 65535 objects in one tile do not fit a PNG mask")


def _write_index(folder: Path, rows, classes, values, tile, overlap, mpp, items) -> None:
    fields = ["image", "mask", "source", "x", "y", "size_level0", "tissue", "foreground", "values"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    (folder / "tiles.csv").write_text(text.getvalue())
    meta = {
        "tiles": len(rows),
        "tile_size": tile,
        "overlap": overlap,
        "mpp": mpp if mpp is not None else _common({i.mpp for i in items}),
        "mask_values": values,
        "classes": {str(i): c for i, c in enumerate(classes, start=1)} if values == "class" else {},
        "sources": [{"image": i.image.name, "width": i.shape[1], "height": i.shape[0], "mpp": i.mpp} for i in items],
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))


def _common(values: set):
    """The one value all sources share, or None when they differ."""
    return next(iter(values)) if len(values) == 1 else None
