"""The real slides in ../shared/data/wsi: shapes, pixel sizes and pixels as the vendors' readers give them."""

from __future__ import annotations

import numpy as np
import openslide
import pytest

from conftest import require_shared
from napari_nephro import SlideError, open_slide

pytestmark = pytest.mark.shared

# (file, backend, vendor, level shapes (h, w), mpp, objective power, associated images, tile)
BRIGHTFIELD = [
    (
        "CMU-1-Small-Region.svs",
        "openslide",
        "aperio",
        [(2967, 2220)],
        0.499,
        20.0,
        ["label", "macro", "thumbnail"],
        (240, 240),
    ),
    (
        "tcga-cr-7395-01a-01-ts1.svs",
        "openslide",
        "aperio",
        [(3567, 4443), (1783, 2221)],
        None,
        None,
        ["thumbnail"],
        (256, 256),
    ),
    (
        "CMU-1-Small-Region-dicom",
        "openslide",
        "dicom",
        [(2967, 2220)],
        0.499,
        None,
        ["label", "macro", "thumbnail"],
        (240, 240),
    ),
    (
        "small_HE_levels.tiff",
        "tifffile",
        "generic",
        [(250, 300), (125, 150), (62, 75), (31, 37)],
        None,
        None,
        [],
        (64, 64),
    ),
]


@pytest.mark.parametrize(("name", "backend", "vendor", "shapes", "mpp", "power", "associated", "tile"), BRIGHTFIELD)
def test_real_slide_metadata(name, backend, vendor, shapes, mpp, power, associated, tile):
    with open_slide(require_shared("wsi", name)) as slide:
        assert slide.backend == backend and slide.vendor == vendor
        assert slide.level_shapes == shapes
        assert [lv.shape for lv in slide.levels] == [(*s, 3) for s in shapes]
        assert slide.levels[0].chunksize == (*tile, 3)
        assert slide.mpp == (pytest.approx(mpp) if mpp else None)
        assert slide.objective_power == power
        assert slide.associated_images == associated
        for name_ in associated:
            image = slide.associated_image(name_)
            assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


@pytest.mark.parametrize(
    ("name", "level", "box"),
    [
        ("CMU-1-Small-Region.svs", 0, (1000, 1200, 500, 400)),
        ("tcga-cr-7395-01a-01-ts1.svs", 0, (1500, 1000, 700, 300)),
        ("tcga-cr-7395-01a-01-ts1.svs", 1, (512, 256, 256, 200)),  # one tile of a level at downsample 2.0005
    ],
)
def test_real_pixels_equal_openslide_read_region(name, level, box):
    path = require_shared("wsi", name)
    x, y, w, h = box
    with open_slide(path) as slide, openslide.OpenSlide(str(path)) as reference:
        expected = _openslide_region(reference, level, box)
        np.testing.assert_array_equal(slide.region(level, box), expected)
        np.testing.assert_array_equal(slide.levels[level][y : y + h, x : x + w].compute(), expected)


def test_non_integer_downsample_level_stays_within_openslides_resampling():
    """OpenSlide resamples a level whose downsample is not whole (2.0005 here) by a sub-pixel
    shift that depends on where a read starts, so tile-by-tile reads differ from one big read
    by that shift: far less than the same image moved by one whole pixel."""
    path = require_shared("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    box = (700, 500, 600, 400)
    with open_slide(path) as slide, openslide.OpenSlide(str(path)) as reference:
        ref = _openslide_region(reference, 1, box).astype(int)
        ours = slide.region(1, box).astype(int)
    one_pixel_shift = np.abs(ref[:, 1:] - ref[:, :-1]).mean()
    assert np.abs(ours - ref).mean() < one_pixel_shift / 4


def _openslide_region(reference: openslide.OpenSlide, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    ds = reference.level_downsamples[level]
    return np.asarray(reference.read_region((round(x * ds), round(y * ds)), level, (w, h)))[..., :3]


def test_dicom_series_is_the_same_slide_as_the_svs():
    svs = open_slide(require_shared("wsi", "CMU-1-Small-Region.svs"))
    folder = require_shared("wsi", "CMU-1-Small-Region-dicom")
    for source in [folder, *sorted(folder.glob("*.dcm"))]:  # the folder or any file of the series
        dicom = open_slide(source)
        assert dicom.level_shapes == svs.level_shapes and dicom.mpp == pytest.approx(0.499)
    a = svs.region(0, (600, 800, 512, 512)).astype(int)
    b = open_slide(folder).region(0, (600, 800, 512, 512)).astype(int)
    # Re-encoded tiles of the same scan: closer than the scan is to itself moved by one pixel.
    assert np.abs(a - b).mean() < np.abs(a[:, 1:] - a[:, :-1]).mean() / 2


def test_generic_pyramid_matches_openslide_pixel_for_pixel():
    path = require_shared("wsi", "small_HE_levels.tiff")
    mine = open_slide(path)
    with openslide.OpenSlide(str(path)) as reference:
        for level in (0, 1):
            w, h = reference.level_dimensions[level]
            expected = np.asarray(reference.read_region((0, 0), level, (w, h)))[..., :3]
            np.testing.assert_array_equal(mine.levels[level].compute(), expected)


@pytest.mark.parametrize("name", ["multi-channel-z-series.ome.tif", "small_vectra.qptiff"])
def test_fluorescence_files_are_refused_clearly(name):
    with pytest.raises(SlideError, match=r"not a brightfield RGB image \(axes C") as info:
        open_slide(require_shared("wsi", name))
    assert name in str(info.value) and "\n" not in str(info.value)
