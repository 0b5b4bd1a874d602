"""What an attack run broke: stripped and planar TIFFs, tiny images, absurd declared sizes,
absurd pixel sizes and symbolic link loops. Legit files read every pixel right; the rest is
refused at open in one line, and `nephro` leaves nothing behind."""

from __future__ import annotations

import json
import tracemalloc
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

import napari_nephro.tiling as tiling
from conftest import random_levels, write_pyramid
from napari_nephro.annotations.omezarr import read_label_zarr
from napari_nephro.cli import main
from napari_nephro.io import SlideError, open_slide
from napari_nephro.io.backend import MAX_LEVEL_PIXELS, MAX_TILE_PIXELS, to_rgb
from napari_nephro.tiling import read_scaled

MPP = 1.0  # the tiny model's own pixel size: slides are read at their own scale


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A fresh U-Net with 64 px tiles: a whole run of `nephro segment` takes about a second."""
    out = tmp_path_factory.mktemp("model") / "unet"
    args = ["model", "init", "--arch", "unet", "--encoder", "resnet18", "--out", str(out)]
    assert main([*args, "--tile", "64", "--overlap", "16", "--input", "64", "--mpp", str(MPP)]) == 0
    return out


def segment(slide, model, out, *extra: str) -> int:
    return main(["segment", str(slide), "--model", str(model), "--out", str(out), "--device", "cpu", *extra])


def assert_one_line_refusal(capsys, rc: int, *words: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("nephro: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def features(path) -> list:
    """A GeoJSON's objects without their random ids."""
    data = json.loads(path.read_text())
    return [(f["geometry"], f["properties"]["classification"]["name"]) for f in data["features"]]


def write_sparse(path, shape, *, tile=None, rowsperstrip=None):
    """A TIFF that declares `shape` but stores no pixel data at all (every segment empty): a few KB."""
    h, w = shape[:2]
    count = -(-h // tile[0]) * -(-w // tile[1]) if tile else -(-h // (rowsperstrip or h))
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(
            (b"" for _ in range(count)),
            shape=shape,
            dtype="uint8",
            tile=tile,
            rowsperstrip=rowsperstrip,
            photometric="rgb" if len(shape) == 3 else "minisblack",
            compression="zlib",
        )
    return path


def as_rgb(array: np.ndarray) -> np.ndarray:
    return to_rgb(array)


# -- 1. stripped and planar TIFFs ------------------------------------------------------


@pytest.mark.parametrize("rows_per_strip", [16, 7, 25, 100, 500])  # divides 100 or not, one strip, more than the height
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_stripped_tiffs_read_every_pixel(tmp_path, rows_per_strip, channels, compression):
    (pixels,) = random_levels((100, 80), 1, seed=rows_per_strip, channels=channels)
    path = tmp_path / "s.tif"
    photometric = "rgb" if channels == 3 else "minisblack"
    tifffile.imwrite(path, pixels, photometric=photometric, rowsperstrip=rows_per_strip, compression=compression)
    slide = open_slide(path)
    expected = as_rgb(pixels)
    assert slide.level_shapes == [(100, 80)]
    np.testing.assert_array_equal(slide.levels[0].compute(), expected)
    np.testing.assert_array_equal(slide.region(0, (3, 13, 70, 80)), expected[13:93, 3:73])
    np.testing.assert_array_equal(slide.region(0, (79, 99, 1, 1)), expected[99:, 79:])


@pytest.mark.parametrize(
    "layout",
    [{"rowsperstrip": 16}, {"rowsperstrip": 7}, {"rowsperstrip": 500}, {"tile": (16, 16)}, {"tile": (32, 48)}],
    ids=["strips16", "strips7", "one-strip", "tiles16", "tiles32x48"],
)
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_rgb_stored_as_separate_planes_reads_every_pixel(tmp_path, layout, compression):
    (pixels,) = random_levels((100, 80), 1, seed=7)
    path = tmp_path / "planar.tif"
    planes = np.moveaxis(pixels, -1, 0).copy()  # (3, 100, 80): one plane per sample
    tifffile.imwrite(path, planes, photometric="rgb", planarconfig="separate", compression=compression, **layout)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages.first.planarconfig == tifffile.PLANARCONFIG.SEPARATE
    slide = open_slide(path)
    assert slide.level_shapes == [(100, 80)]
    np.testing.assert_array_equal(slide.levels[0].compute(), pixels)
    np.testing.assert_array_equal(slide.region(0, (17, 31, 50, 60)), pixels[31:91, 17:67])


def test_separate_planes_of_a_pyramid_and_with_alpha(tmp_path):
    levels = random_levels((96, 80), 2, seed=8)
    path = tmp_path / "planar.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        planes = [np.moveaxis(lv, -1, 0).copy() for lv in levels]
        common = {"photometric": "rgb", "planarconfig": "separate", "tile": (16, 16), "compression": "zlib"}
        tif.write(planes[0], subifds=1, **common)
        tif.write(planes[1], subfiletype=1, **common)
    slide = open_slide(path)
    for i, expected in enumerate(levels):
        np.testing.assert_array_equal(slide.levels[i].compute(), expected)
    rgba = np.concatenate([levels[0], np.full((96, 80, 1), 255, np.uint8)], axis=-1)
    tifffile.imwrite(
        tmp_path / "rgba.tif", np.moveaxis(rgba, -1, 0).copy(), photometric="rgb", planarconfig="separate",
        extrasamples=["unassalpha"], rowsperstrip=9,
    )  # fmt: skip
    np.testing.assert_array_equal(open_slide(tmp_path / "rgba.tif").levels[0].compute(), levels[0])


def test_a_tall_uncompressed_single_strip_is_read_in_bands_not_whole(tmp_path):
    """tifffile, ImageJ and many scanners write an uncompressed image as one strip: it is read row band by band."""
    (pixels,) = random_levels((700, 50), 1, seed=9)
    path = tmp_path / "one-strip.tif"
    tifffile.imwrite(path, pixels, photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages.first.dataoffsets) == 1
    slide = open_slide(path)
    assert slide.tile_shapes == [(256, 50)]
    np.testing.assert_array_equal(slide.levels[0].compute(), pixels)
    np.testing.assert_array_equal(slide.region(0, (5, 500, 40, 200)), pixels[500:700, 5:45])


def test_stripped_and_planar_files_segment_exactly_like_the_plain_file(tmp_path, tiny_model):
    (pixels,) = random_levels((100, 80), 1, seed=10)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, pixels, photometric="rgb", tile=(32, 32))
    variants = {
        "strips": ({"rowsperstrip": 16, "compression": "zlib"}, pixels),
        "planar-strips": ({"rowsperstrip": 7, "planarconfig": "separate"}, np.moveaxis(pixels, -1, 0).copy()),
        "planar-tiles": ({"tile": (16, 16), "planarconfig": "separate"}, np.moveaxis(pixels, -1, 0).copy()),
    }
    args = ("--mpp", str(MPP), "--all-tiles")
    assert segment(plain, tiny_model, tmp_path / "plain.zarr", *args) == 0
    assert segment(plain, tiny_model, tmp_path / "plain.geojson", *args) == 0
    truth = np.asarray(read_label_zarr(tmp_path / "plain.zarr").levels[0])
    assert truth.shape == (100, 80) and 0 < truth.mean() < 1  # random weights: objects and background both
    assert features(tmp_path / "plain.geojson")
    for name, (layout, data) in variants.items():
        path = tmp_path / f"{name}.tif"
        tifffile.imwrite(path, data, photometric="rgb", **layout)
        np.testing.assert_array_equal(open_slide(path).levels[0].compute(), pixels)
        assert segment(path, tiny_model, tmp_path / f"{name}.zarr", *args) == 0
        np.testing.assert_array_equal(np.asarray(read_label_zarr(tmp_path / f"{name}.zarr").levels[0]), truth)
    assert segment(tmp_path / "planar-strips.tif", tiny_model, tmp_path / "planar.geojson", *args) == 0
    assert features(tmp_path / "planar.geojson") == features(tmp_path / "plain.geojson")
    assert not list(tmp_path.glob("*.partial.zarr"))


# -- 2. images smaller than one tile ---------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (1, 300), (300, 1)])
def test_images_smaller_than_a_tile_read_exactly(tmp_path, shape):
    (pixels,) = random_levels(shape, 1, seed=11)
    for name, layout in {"strips.tif": {"rowsperstrip": 16}, "tiles.tif": {"tile": (16, 16)}}.items():
        tifffile.imwrite(tmp_path / name, pixels, photometric="rgb", compression="zlib", **layout)
        np.testing.assert_array_equal(open_slide(tmp_path / name).levels[0].compute(), pixels)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    slide = open_slide(tmp_path / "plain.png")
    np.testing.assert_array_equal(slide.levels[0].compute(), pixels)
    np.testing.assert_array_equal(read_scaled(slide, (0, 0, shape[1], shape[0]), shape), pixels)


@pytest.mark.parametrize(
    ("shape", "suffix"), [((1, 1), ".tif"), ((3, 5), ".tif"), ((1, 300), ".tif"), ((1, 1), ".png"), ((3, 5), ".png")]
)
def test_images_smaller_than_a_tile_segment_to_zarr_and_geojson(tmp_path, tiny_model, capsys, shape, suffix):
    (pixels,) = random_levels(shape, 1, seed=12)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, pixels, photometric="rgb", rowsperstrip=16, compression="zlib")
    else:
        Image.fromarray(pixels).save(path)
    assert segment(path, tiny_model, tmp_path / "out.zarr", "--mpp", str(MPP)) == 0
    labels = read_label_zarr(tmp_path / "out.zarr")
    assert labels.levels[0].shape == shape
    assert set(np.unique(np.asarray(labels.levels[0]))) <= {0, 1}
    assert segment(path, tiny_model, tmp_path / "out.geojson", "--mpp", str(MPP)) == 0
    assert json.loads((tmp_path / "out.geojson").read_text())["type"] == "FeatureCollection"
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "out.zarr", "out.geojson"])


# -- 3. absurd declared sizes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "layout", "words"),
    [
        ((10**6, 10**6, 3), {"tile": (8192, 8192)}, ["1000000 x 1000000", "1 Tpx", "275 Gpx"]),
        ((100, 100, 3), {"tile": (16384, 16384)}, ["tiles of 16384 x 16384", "134 Mpx"]),
        ((20000, 20000), {"rowsperstrip": 20000}, ["strips of 20000 x 20000", "134 Mpx"]),
    ],
    ids=["level-0", "tile", "strip"],
)
def test_absurd_declared_sizes_are_refused_at_open_in_one_line(tmp_path, tiny_model, capsys, shape, layout, words):
    assert MAX_LEVEL_PIXELS == 2**38 and MAX_TILE_PIXELS == 2**27
    path = write_sparse(tmp_path / "huge.tif", shape, **layout)
    assert path.stat().st_size < 2**20  # nothing of it is stored: only the header says so
    with pytest.raises(SlideError) as info:
        open_slide(path)
    assert all(word in str(info.value) for word in words), info.value
    if layout.get("tile"):  # OpenSlide reads tiled generic TIFF: its sizes are checked before any tile is read
        with pytest.raises(SlideError, match=words[-1]):
            open_slide(path, backend="openslide")
    assert_one_line_refusal(capsys, segment(path, tiny_model, tmp_path / "out.zarr", "--mpp", "1"), *words)
    assert_one_line_refusal(capsys, segment(path, tiny_model, tmp_path / "out.geojson", "--mpp", "1"), *words)
    assert_one_line_refusal(capsys, main(["info", str(path)]), *words)
    assert [p.name for p in tmp_path.iterdir()] == ["huge.tif"]


def test_a_deflate_bomb_tile_is_refused_in_one_line_without_inflating_it(tmp_path, tiny_model, capsys):
    """A 64 px tile whose deflate stream unpacks to 64 MB: decoded into a buffer of the tile's size, it fails."""
    bomb = zlib.compress(bytes(64 * 2**20), 9)
    path = tmp_path / "bomb.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(iter([bomb]), shape=(64, 64, 3), dtype="uint8", tile=(64, 64), photometric="rgb", compression="zlib")
    slide = open_slide(path)  # the header is sane: the damage shows when the tile is decoded
    tracemalloc.start()
    try:
        with pytest.raises(SlideError, match="cannot decode level 0"):
            slide.levels[0].compute()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20
    assert_one_line_refusal(capsys, segment(path, tiny_model, tmp_path / "out.zarr", "--mpp", "1"), "cannot decode")
    assert_one_line_refusal(capsys, segment(path, tiny_model, tmp_path / "o.geojson", "--mpp", "1"), "cannot decode")
    assert [p.name for p in tmp_path.iterdir()] == ["bomb.tif"]


def test_read_scaled_reads_a_large_level_block_by_block(tmp_path, monkeypatch):
    """A one-level slide's tissue thumbnail reads all of level 0, in bounded blocks, never whole."""
    path = write_sparse(tmp_path / "sparse.tif", (6000, 6000, 3), tile=(512, 512))  # 108 MB as one array
    slide = open_slide(path, cache_bytes=0)
    monkeypatch.setattr(tiling, "READ_BLOCK_PIXELS", 2**20)
    monkeypatch.setattr(tiling, "REDUCE_BLOCK_PIXELS", 2**19)
    reads = []
    real_region = slide.region
    monkeypatch.setattr(slide, "region", lambda level, box: reads.append(box) or real_region(level, box))
    tracemalloc.start()
    try:
        thumb = read_scaled(slide, (0, 0, 6000, 6000), (200, 200))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert thumb.shape == (200, 200, 3) and (thumb == 255).all()
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    # every pixel of the level was read (white because the file is white, not because nothing was read),
    # in blocks of at most a band of whole tiles
    assert sum(w * h for _, _, w, h in reads) == 6000 * 6000
    assert max(w * h for _, _, w, h in reads) <= max(2**19, 512 * 6000)


def test_read_scaled_allocates_nothing_for_a_box_mostly_off_the_slide(tmp_path):
    """A 1x1 image under a tile 100000 px wide: the old code padded the whole box at level 0 (30 GB)."""
    Image.fromarray(np.array([[[10, 20, 30]]], np.uint8)).save(tmp_path / "dot.png")
    slide = open_slide(tmp_path / "dot.png")
    tracemalloc.start()
    try:
        out = read_scaled(slide, (-50_000, -50_000, 100_000, 100_000), (64, 64))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"peak {peak / 2**20:.1f} MiB"
    expected = np.full((64, 64, 3), 255, np.uint8)
    expected[32, 32] = np.floor((np.array([10, 20, 30]) + 255 * (1562 * 1562 - 1)) / (1562 * 1562) + 0.5)
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_blockwise_and_direct_resampling_agree(tmp_path, monkeypatch):
    levels = random_levels((301, 437), 3, seed=13)
    slide = open_slide(write_pyramid(tmp_path / "p.tif", levels, "pages"))
    rng = np.random.default_rng(14)
    for _ in range(60):
        size = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        scale = float(rng.uniform(1.0, 25.0))
        w, h = size[1] * scale, size[0] * scale
        box = (float(rng.uniform(-w, 440)), float(rng.uniform(-h, 300)), w, h)
        monkeypatch.setattr(tiling, "READ_BLOCK_PIXELS", 2**26)
        direct = read_scaled(slide, box, size)
        monkeypatch.setattr(tiling, "READ_BLOCK_PIXELS", 1)
        monkeypatch.setattr(tiling, "REDUCE_BLOCK_PIXELS", 97)  # many blocks, each smaller than a tile
        blockwise = read_scaled(slide, box, size)
        monkeypatch.setattr(tiling, "REDUCE_BLOCK_PIXELS", 2**22)
        assert blockwise.shape == direct.shape == (*size, 3)
        assert np.abs(blockwise.astype(int) - direct).max() <= 1, box  # Pillow rounds after each of its passes
    # the level's own pixels come back exactly, and glass outside the slide is white
    np.testing.assert_array_equal(read_scaled(slide, (10, 20, 30, 40), (40, 30)), levels[0][20:60, 10:40])
    off = read_scaled(slide, (-100, -100, 100, 100), (10, 10))
    assert (off == 255).all()


# -- 4. absurd pixel sizes -------------------------------------------------------------


def test_implausible_pixel_sizes_are_refused_in_one_line(tmp_path, tiny_model, capsys):
    png = tmp_path / "plain.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(png)
    for bad in (1e-9, 0.001, 51, 1e9, 0, -1, float("nan"), float("inf")):
        with pytest.raises(SlideError, match=r"from 0\.01 to 50 um/px"):
            open_slide(png, mpp=bad)
        with pytest.raises(SlideError, match="pixel size"):
            open_slide(png).set_mpp(bad)
    assert open_slide(png, mpp=0.01).mpp == 0.01 and open_slide(png, mpp=50).mpp == 50
    rc = segment(png, tiny_model, tmp_path / "out.zarr", "--mpp", "1e-9")
    assert_one_line_refusal(capsys, rc, "1e-09 um/px", "0.01 to 50")
    assert_one_line_refusal(capsys, segment(png, tiny_model, tmp_path / "o.geojson", "--mpp", "1e9"), "0.01 to 50")
    assert_one_line_refusal(capsys, main(["info", str(png), "--mpp", "1e-9"]), "0.01 to 50")
    assert [p.name for p in tmp_path.iterdir()] == ["plain.png"]


# -- 5. symbolic link loops ------------------------------------------------------------


def test_a_symbolic_link_loop_is_named_as_such(tmp_path, tiny_model, capsys):
    (tmp_path / "a.svs").symlink_to(tmp_path / "b.svs")
    (tmp_path / "b.svs").symlink_to(tmp_path / "a.svs")
    with pytest.raises(SlideError, match="symbolic link loop"):
        open_slide(tmp_path / "a.svs")
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "missing.svs")
    assert_one_line_refusal(capsys, main(["info", str(tmp_path / "a.svs")]), "symbolic link loop")
    rc = segment(tmp_path / "a.svs", tiny_model, tmp_path / "out.zarr", "--mpp", "1")
    assert_one_line_refusal(capsys, rc, "symbolic link loop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.svs", "b.svs"]
