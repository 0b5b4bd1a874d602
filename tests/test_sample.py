"""The sample slide: four real AIDPATH PAS tiles as a pyramidal OME-TIFF, with their glomeruli annotated."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from conftest import require_shared
from napari_nephro.annotations import rasterize, read_annotations
from napari_nephro.cli import main
from napari_nephro.io import open_slide
from napari_nephro.sample import (
    SAMPLE_CLASS,
    SAMPLE_TILES,
    TILE_SIDE,
    sample_annotations,
    sample_annotations_path,
    sample_slide_path,
    sample_tile_names,
)

MIN_GLOMERULUS_UM2 = 2000.0
MPP = 0.5


def _tiles():
    """(name, row slice, column slice) of each tile in the mosaic."""
    for r, row in enumerate(SAMPLE_TILES):
        for c, name in enumerate(row):
            yield name, slice(r * TILE_SIDE, (r + 1) * TILE_SIDE), slice(c * TILE_SIDE, (c + 1) * TILE_SIDE)


def test_the_sample_slide_is_a_small_pyramid_at_half_a_micrometre():
    slide = open_slide(sample_slide_path())
    assert slide.backend == "tifffile" and slide.vendor == "ome"
    assert slide.mpp == pytest.approx(0.5) and slide.level_shapes[0] == (2048, 2048)
    assert len(slide.level_shapes) >= 3 and max(slide.level_shapes[-1]) <= 256
    assert all(t[0] < 2048 for t in slide.tile_shapes)  # tiled, not one strip
    description = slide.properties["tiff.ImageDescription"]
    assert "AIDPATH" in description and "CC BY 4.0" in description and "tile borders" in description


@pytest.mark.shared
def test_the_sample_holds_the_four_aidpath_tiles_in_place():
    """Each quarter of the mosaic is its AIDPATH tile (JPEG-close), not a neighbour's or a flipped one."""
    source = require_shared("glomeruli", "aidpath_pas", "images")
    level0 = open_slide(sample_slide_path()).region(0, (0, 0, 2048, 2048))
    for name, rows, cols in _tiles():
        original = np.asarray(Image.open(source / f"{name}.png").convert("RGB")).astype(np.float32)
        quarter = level0[rows, cols].astype(np.float32)
        assert np.abs(quarter - original).mean() < 3, name
        others = [np.abs(level0[r, c].astype(np.float32) - original).mean() for n, r, c in _tiles() if n != name]
        assert min(others) > 15, name


@pytest.mark.shared
def test_the_annotations_are_the_masks_glomeruli_inside_their_tiles():
    masks = require_shared("glomeruli", "aidpath_pas", "masks")
    annotations = read_annotations(sample_annotations_path())
    expected = 0
    for name in sample_tile_names():
        mask = np.asarray(Image.open(masks / f"{name}.png"))[..., 0] > 0
        labels, n = ndimage.label(mask)
        areas = ndimage.sum(mask, labels, range(1, n + 1)) * MPP**2
        expected += int((areas > MIN_GLOMERULUS_UM2).sum())
    assert expected == 6 and len(annotations) == expected
    assert set(annotations.counts()) == {SAMPLE_CLASS}
    x0, y0, x1, y1 = np.array([a.bounds for a in annotations]).T
    assert x0.min() >= 0 and y0.min() >= 0 and x1.max() <= 2048 and y1.max() <= 2048
    # drawn again, every tile's glomeruli cover its mask's, pixel for pixel but for the straightened outlines
    drawn = rasterize(annotations, (2048, 2048)) > 0
    for name, rows, cols in _tiles():
        mask = np.asarray(Image.open(masks / f"{name}.png"))[..., 0] > 0
        iou = (drawn[rows, cols] & mask).sum() / (drawn[rows, cols] | mask).sum()
        assert iou > 0.97, (name, iou)


def test_the_annotations_file_is_the_shipped_polygons_moved_into_the_mosaic():
    written, shipped = read_annotations(sample_annotations_path()), sample_annotations()
    assert len(written) == len(shipped) == 6
    for a, b in zip(written, shipped, strict=True):
        assert a.geometry.equals(b.geometry)
    tiles = [a.properties["tile"] for a in shipped]
    assert tiles == sorted(tiles, key=sample_tile_names().index)  # tile by tile, in mosaic order


def test_a_broken_install_is_one_line_and_leaves_no_sample_behind(tmp_path, monkeypatch, capsys):
    import napari_nephro.sample as sample

    cache = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_NEPHRO_CACHE", str(cache))
    monkeypatch.setattr(sample, "DATA_DIR", tmp_path / "nothing-here")
    assert main(["demo", "--headless", "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reinstall" in err
    assert not (tmp_path / "out").exists() and (not cache.exists() or not list(cache.iterdir()))
