"""Synthetic pyramids with known pixels: every level, every region, exactly."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from conftest import random_levels, write_pyramid
from napari_nephro import SlideError, open_slide


@pytest.mark.parametrize("layout", ["ome", "pages"])
def test_every_level_returns_exactly_the_written_pixels(tmp_path, layout):
    levels = random_levels((301, 437), 3, seed=1)
    slide = open_slide(write_pyramid(tmp_path / f"p-{layout}.tif", levels, layout))
    assert slide.backend == "tifffile"
    assert slide.level_shapes == [lv.shape[:2] for lv in levels]
    rng = np.random.default_rng(2)
    for i, expected in enumerate(levels):
        dask_level = slide.levels[i]
        assert dask_level.shape == expected.shape and dask_level.dtype == np.uint8
        assert dask_level.chunksize == (64, 48, 3)  # chunked on the file's own tiles
        np.testing.assert_array_equal(dask_level.compute(), expected)
        h, w = expected.shape[:2]
        for _ in range(10):
            x, y = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
            bw, bh = int(rng.integers(1, w - x + 1)), int(rng.integers(1, h - y + 1))
            np.testing.assert_array_equal(slide.region(i, (x, y, bw, bh)), expected[y : y + bh, x : x + bw])
            np.testing.assert_array_equal(
                dask_level[y : y + bh, x : x + bw].compute(), expected[y : y + bh, x : x + bw]
            )


@pytest.mark.parametrize("layout", ["ome", "pages"])
def test_scales_follow_downsamples_and_mpp(tmp_path, layout):
    levels = random_levels((256, 384), 3)
    slide = open_slide(write_pyramid(tmp_path / "p.tif", levels, layout, mpp=0.25))
    assert slide.mpp == pytest.approx(0.25)
    assert slide.level_downsamples == pytest.approx([1.0, 2.0, 4.0])
    for i, ds in enumerate(slide.level_downsamples):
        assert slide.level_mpp(i) == pytest.approx((0.25 * ds, 0.25 * ds))


def test_stripped_tiff_reads_in_bands(tmp_path):
    (level,) = random_levels((300, 200), 1, seed=3)
    slide = open_slide(write_pyramid(tmp_path / "s.tif", [level], "strips"))
    assert slide.tile_shapes[0][1] == 200 and slide.tile_shapes[0][0] % 7 == 0  # whole strips per chunk
    np.testing.assert_array_equal(slide.levels[0].compute(), level)
    np.testing.assert_array_equal(slide.region(0, (13, 250, 100, 50)), level[250:300, 13:113])


def test_grayscale_tiff_becomes_rgb(tmp_path):
    levels = random_levels((128, 96), 2, channels=1)
    slide = open_slide(write_pyramid(tmp_path / "g.tif", levels, "pages"))
    out = slide.levels[1].compute()
    assert out.shape == (64, 48, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], levels[1])


def test_openslide_and_tifffile_agree_on_a_generic_tiff(tmp_path):
    levels = random_levels((256, 320), 2, seed=5)
    path = write_pyramid(tmp_path / "generic.tif", levels, "pages", tile=(64, 64))
    by_tifffile = open_slide(path, backend="tifffile")
    by_openslide = open_slide(path, backend="openslide")
    assert by_openslide.backend == "openslide"
    for i in range(2):
        np.testing.assert_array_equal(by_openslide.levels[i].compute(), levels[i])
        np.testing.assert_array_equal(by_tifffile.levels[i].compute(), levels[i])


def test_opening_decodes_nothing_and_a_region_decodes_only_its_tiles(tmp_path):
    levels = random_levels((512, 512), 1)
    slide = open_slide(write_pyramid(tmp_path / "lazy.tif", levels, "ome", tile=(64, 64)))
    assert slide.cache.misses == 0 and len(slide.cache) == 0
    slide.region(0, (70, 70, 100, 50))  # x 70..170 -> tile columns 1, 2; y 70..120 -> row 1
    assert slide.cache.misses == 2
    slide.levels[0][70:120, 70:170].compute()
    assert slide.cache.misses == 2 and slide.cache.hits >= 2  # the second read came from the cache


def test_cache_stays_within_its_byte_budget(tmp_path):
    levels = random_levels((512, 512), 1)
    tile_bytes = 64 * 64 * 3
    slide = open_slide(write_pyramid(tmp_path / "c.tif", levels, "ome", tile=(64, 64)), cache_bytes=5 * tile_bytes)
    np.testing.assert_array_equal(slide.levels[0].compute(), levels[0])
    assert slide.cache.nbytes <= 5 * tile_bytes and len(slide.cache) == 5


def test_slide_and_its_levels_survive_pickling(tmp_path):
    levels = random_levels((200, 300), 2)
    slide = open_slide(write_pyramid(tmp_path / "pk.tif", levels, "ome", mpp=None), mpp=0.3)
    clone = pickle.loads(pickle.dumps(slide))
    assert clone.mpp == pytest.approx(0.3) and clone.mpp_source == "user"
    np.testing.assert_array_equal(clone.region(1, (5, 6, 40, 30)), levels[1][6:36, 5:45])
    level = pickle.loads(pickle.dumps(slide.levels[1]))  # what a dask worker receives
    np.testing.assert_array_equal(level[6:36, 5:45].compute(), levels[1][6:36, 5:45])


def test_unknown_mpp_is_explicit_and_can_be_set(tmp_path):
    levels = random_levels((64, 64), 1)
    slide = open_slide(write_pyramid(tmp_path / "nompp.tif", levels, "pages", mpp=None))
    assert slide.mpp is None and slide.mpp_source == "unknown" and slide.level_mpp(0) is None
    slide.set_mpp(0.5)
    assert slide.mpp == 0.5 and slide.mpp_source == "user" and slide.info()["levels"][0]["mpp_x"] == 0.5
    for bad in (0, -1, float("nan"), "abc"):
        with pytest.raises(SlideError, match="pixel size"):
            slide.set_mpp(bad)


def test_default_72_dpi_is_not_taken_for_a_pixel_size(tmp_path):
    levels = random_levels((64, 64), 1)
    path = tmp_path / "dpi72.tif"
    import tifffile

    tifffile.imwrite(path, levels[0], photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    assert open_slide(path).mpp is None


def test_png_is_a_one_level_slide_with_dpi_as_pixel_size(tmp_path):
    (pixels,) = random_levels((300, 500), 1, seed=9)
    path = tmp_path / "tile.png"
    Image.fromarray(pixels).save(path, dpi=(25400 / 0.5, 25400 / 0.5))
    slide = open_slide(path)
    assert slide.backend == "image" and slide.level_count == 1
    assert slide.mpp == pytest.approx(0.5, rel=1e-3)
    np.testing.assert_array_equal(slide.levels[0].compute(), pixels)
    np.testing.assert_array_equal(slide.region(0, (100, 200, 50, 100)), pixels[200:300, 100:150])


def test_transparent_png_pixels_become_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:5, :, :] = (10, 20, 30, 255)
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(path)
    out = open_slide(path).levels[0].compute()
    assert (out[:5] == (10, 20, 30)).all() and (out[5:] == 255).all()


def test_jpeg_opens_as_rgb(tmp_path):
    (pixels,) = random_levels((120, 160), 1)
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    slide = open_slide(path)
    assert slide.levels[0].shape == (120, 160, 3) and slide.mpp is None


def test_region_outside_the_level_is_refused(tmp_path):
    levels = random_levels((64, 64), 1)
    slide = open_slide(write_pyramid(tmp_path / "r.tif", levels, "pages"))
    for box in [(60, 0, 10, 10), (0, 0, 0, 5), (-1, 0, 5, 5)]:
        with pytest.raises(SlideError, match="outside level 0"):
            slide.region(0, box)
    with pytest.raises(SlideError, match="no level 3"):
        slide.region(3, (0, 0, 1, 1))


def test_display_pyramid_adds_averaged_levels_only_where_the_file_has_too_few(tmp_path):
    from napari_nephro.io.pyramid import display_pyramid

    (pixels,) = random_levels((1000, 301), 1, seed=4)
    slide = open_slide(write_pyramid(tmp_path / "tall.tif", [pixels], "strips"))
    levels = display_pyramid(slide.levels, max_side=300)
    assert [lv.shape[:2] for lv in levels] == [(1000, 301), (500, 150), (250, 75)]
    assert slide.level_count == 1  # the file's own levels are untouched
    expected = pixels[:1000, :300].reshape(500, 2, 150, 2, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(levels[1].compute(), np.round(expected).astype(np.uint8))
    assert len(display_pyramid(slide.levels, max_side=1000)) == 1  # big enough already


def test_a_pickled_slide_reopens_with_the_same_backend_and_cache(tmp_path):
    path = write_pyramid(tmp_path / "generic.tif", random_levels((256, 320), 2, seed=5), "pages", tile=(64, 64))
    slide = open_slide(path, backend="openslide", cache_bytes=12345)
    clone = pickle.loads(pickle.dumps(slide))
    assert clone.backend == "openslide" and clone.cache.max_bytes == 12345


def test_tiles_and_associated_images_read_from_many_threads_are_intact(tmp_path):
    """One file position is shared by the tile reads and tifffile's own reads of associated images."""
    from concurrent.futures import ThreadPoolExecutor

    from napari_nephro.synthetic import write_synthetic_slide

    slide = open_slide(write_synthetic_slide(tmp_path / "s.ome.tif"), cache_bytes=0)
    assert slide.backend == "tifffile" and "label" in slide.associated_images
    rows, cols = (-(-s // t) for s, t in zip(slide.level_shapes[1], slide.tile_shapes[1], strict=True))
    keys = [(ty, tx) for ty in range(rows) for tx in range(cols)]
    expected_tiles = {k: slide._backend.read_tile(1, *k) for k in keys}
    expected_label = slide.associated_image("label")

    def work(i):
        if i % 3 == 0:
            return "label", slide.associated_image("label")
        k = keys[i % len(keys)]
        return k, slide._backend.read_tile(1, *k)

    with ThreadPoolExecutor(8) as pool:
        for key, pixels in pool.map(work, range(300)):
            np.testing.assert_array_equal(pixels, expected_label if key == "label" else expected_tiles[key])
