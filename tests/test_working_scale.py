"""Whole-slide results at the model's working scale: the same objects as at full resolution, in slide coordinates.

A deterministic "model" (smoothed darkness, two classes) runs over a real slide at
1 um/px (the slide is at 0.499 um/px, so a working pixel is ~2 slide pixels) once
at full resolution and once at the working scale, the default. Everything that
reads our outputs (the annotation readers, evaluate, export) must place the
coarse one on the slide exactly where the full one is.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import shapely
import tifffile
from scipy import ndimage

from conftest import require_shared
from napari_nephro.annotations import read_annotations
from napari_nephro.annotations.io import read_label_file
from napari_nephro.annotations.omezarr import read_label_zarr
from napari_nephro.cli import main
from napari_nephro.evaluation.instances import match_instances
from napari_nephro.inference import segment_slide
from napari_nephro.inference.instance_api import read_nuclei_table, segment_instances_slide
from napari_nephro.inference.plan import cells, resolve_downsample
from napari_nephro.inference.stitch import RowResampler
from napari_nephro.io import open_slide
from napari_nephro.models.object_rules import ObjectRules
from napari_nephro.pipelines.evaluate import Labels, Upsampled
from nuclei_oracle import ClassicalNuclei

MODEL_MPP = 1.0
# no object of this pixel map lies between 610 and 790 um² (or 605 and 4400): none is kept at one scale and
# dropped at the other by the area rule
RULES = ObjectRules(min_area_um2=700, split_touching=False, smooth_um=0)
EIGHT = np.ones((3, 3), bool)


class Blobs:
    """Foreground where the tissue, smoothed over ~6 um, is dark; 'dense' where it is darker still."""

    kind, fingerprint, classes = "semantic", "blobs", ["dense", "pale"]
    mpp, tile_size, input_size, overlap = MODEL_MPP, 256, 256, 64

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        dark = ndimage.gaussian_filter((255 - tiles.mean(axis=-1)) / 255, (0, 6, 6))
        foreground = 1 / (1 + np.exp(-(dark - 0.30) * 40))
        dense = 1 / (1 + np.exp(-(dark - 0.42) * 40))
        return np.stack([1 - foreground, dense, foreground - dense + 1e-3], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def slide():
    return open_slide(require_shared("wsi", "CMU-1-Small-Region.svs"))


@pytest.fixture(scope="module")
def runs(slide, tmp_path_factory):
    """The same pixel map (no object rules) written at full resolution and at the default scale, as OME-Zarr."""
    folder = tmp_path_factory.mktemp("scales")
    full = segment_slide(slide, Blobs(), folder / "full.zarr", out_downsample="full", objects=None)
    working = segment_slide(slide, Blobs(), folder / "working.zarr", objects=None)  # the default scale
    return full, working


def _level0(path) -> np.ndarray:
    return np.asarray(read_label_zarr(path).levels[0])


def _upsampled(coarse: np.ndarray, shape, factor: float) -> np.ndarray:
    return Upsampled(Labels(coarse, None, []), shape, factor)[:, :]


def _objects(labels: np.ndarray, value: int, min_px: float) -> np.ndarray:
    """The connected pieces of one class of at least `min_px` pixels, numbered."""
    pieces, _ = ndimage.label(labels == value, EIGHT)
    keep = np.bincount(pieces.ravel()) >= min_px
    keep[0] = False
    return ndimage.label(keep[pieces], EIGHT)[0]


def _edges(labels: np.ndarray) -> np.ndarray:
    """Pixels with another value among their 8 neighbours: both sides of every boundary."""
    return ndimage.grey_dilation(labels, footprint=EIGHT) != ndimage.grey_erosion(labels, footprint=EIGHT)


def test_the_working_scale_is_the_model_grid_never_finer_than_the_slide():
    assert resolve_downsample("working", 2.004) == 2.004
    assert resolve_downsample("working", 0.5) == 1.0  # a model finer than the slide writes full resolution
    assert resolve_downsample("full", 2.004) == 1.0 and resolve_downsample(3, 2.004) == 3.0
    from napari_nephro.inference import SegmentError

    with pytest.raises(SegmentError, match="'working', 'full' or a number"):
        resolve_downsample("half", 2.0)


def test_a_whole_slide_result_is_at_the_model_scale_with_it_in_the_metadata(slide, runs):
    full, working = runs
    scale = MODEL_MPP / slide.mpp
    height, width = slide.level_shapes[0]
    assert working.out_downsample == pytest.approx(scale) and working.mpp == MODEL_MPP
    assert _level0(working.path).shape == (cells(height, scale), cells(width, scale))
    assert _level0(full.path).shape == (height, width) and full.mpp == slide.mpp
    ngff = json.loads((working.path / ".zattrs").read_text())["multiscales"][0]["datasets"][0]
    transforms = {t["type"]: t for t in ngff["coordinateTransformations"]}
    assert transforms["scale"]["scale"] == pytest.approx([slide.mpp * scale] * 2)  # micrometres per pixel
    # a pixel's centre is (scale - 1) / 2 slide pixels from the first slide pixel's centre
    assert transforms["translation"]["translation"] == pytest.approx([(scale - 1) / 2 * slide.mpp] * 2)
    pyramid = read_label_zarr(working.path)
    assert pyramid.slide_shape == (height, width) and pyramid.slide_downsample == pytest.approx(scale)


def test_the_engine_copies_rows_on_the_working_grid():
    rows = np.random.default_rng(0).random((2, 40, 30), dtype=np.float32)
    resampler = RowResampler((100, 30), (100, 30), 1.0)
    (y, out), *_ = resampler.push(0, rows)
    assert resampler.identity and y == 0 and np.shares_memory(out, rows)  # no interpolation, no copy
    np.testing.assert_array_equal(out, rows)
    assert resampler.first_work_row() == 40


def test_upsampled_it_has_the_full_resolution_objects_within_a_working_pixel(slide, runs):
    full, working = runs
    scale = working.out_downsample
    fine = _level0(full.path)
    up = _upsampled(_level0(working.path), fine.shape, scale)
    min_px = RULES.min_area_um2 / slide.mpp**2  # specks aside, as the model's rules would drop them
    for value in (1, 2):
        truth, pred = _objects(fine, value, min_px), _objects(up, value, min_px)
        n = int(truth.max())
        assert n >= 2 and int(pred.max()) == n
        match = match_instances(pred, truth, 0.8)
        assert match.tp == n and match.mean_matched_iou > 0.9
    differ = up != fine
    assert 0 < differ.mean() < 0.01
    # full resolution interpolates the working probabilities: a pixel can change class only next to a place
    # where the working map changes class, i.e. within one working pixel of a boundary of the coarse map
    assert ndimage.distance_transform_edt(~_edges(up))[differ].max() <= math.ceil(scale)
    near_fine = ndimage.distance_transform_edt(~_edges(fine))[differ] <= math.ceil(scale)
    assert near_fine.mean() > 0.999  # and, but for a few pixels where a class's probability is flat, of a fine one


@pytest.fixture(scope="module")
def geojsons(slide, tmp_path_factory):
    folder = tmp_path_factory.mktemp("geojson")
    paths = {}
    for scale in ("full", "working"):
        out = folder / f"{scale}.geojson"
        segment_slide(slide, Blobs(), out, out_downsample=scale, objects=RULES)
        paths[scale] = out
    return paths


def _pairs(a, b):
    """Objects of `a` and `b` paired by class and nearest centroid."""
    assert len(a) == len(b) and a.counts() == b.counts()
    left = list(b)
    for one in a:
        other = min(
            (o for o in left if o.label == one.label), key=lambda o: one.geometry.centroid.distance(o.geometry.centroid)
        )
        left.remove(other)
        yield one, other


def test_geojson_at_both_scales_has_the_same_objects_in_level0_pixels(slide, geojsons):
    scale = MODEL_MPP / slide.mpp
    full, working = read_annotations(geojsons["full"]), read_annotations(geojsons["working"])
    assert len(full) >= 10
    for a, b in _pairs(full, working):
        assert a.geometry.centroid.distance(b.geometry.centroid) < scale  # within one working pixel
        iou = a.geometry.intersection(b.geometry).area / a.geometry.union(b.geometry).area
        assert iou > 0.9
        # outlines apart by less than a working pixel on average along them
        assert a.geometry.symmetric_difference(b.geometry).area < a.geometry.length * scale


@pytest.fixture(scope="module")
def full_polygons(runs):
    """The full-resolution pixel map's objects, one per class, in level-0 pixels."""
    return read_annotations(runs[0].path)


def test_a_label_tiff_at_the_working_scale_reads_back_on_the_slide(slide, runs, full_polygons, tmp_path):
    _, working = runs
    tif = segment_slide(slide, Blobs(), tmp_path / "working.tif", objects=None).path
    with tifffile.TiffFile(tif) as f:
        x_resolution = f.pages[0].tags["XResolution"].value
    assert x_resolution[0] / x_resolution[1] == pytest.approx(1e4 / MODEL_MPP)  # pixels per cm
    label_file = read_label_file(tif)
    assert label_file.mpp == MODEL_MPP and label_file.downsample == pytest.approx(working.out_downsample)
    np.testing.assert_array_equal(label_file.labels > 0, _level0(working.path) > 0)
    _same_place(read_annotations(tif), full_polygons)  # vectorized in level-0 pixels


def _same_place(polygons, reference) -> None:
    """Each class's objects cover what the full-resolution objects of that class cover."""
    assert set(polygons.counts()) == set(reference.counts()) == {"dense", "pale"}
    for name in ("dense", "pale"):
        mine = shapely.union_all([a.geometry for a in polygons if a.label == name])
        theirs = shapely.union_all([a.geometry for a in reference if a.label == name])
        assert mine.intersection(theirs).area / mine.union(theirs).area > 0.95, name


def _evaluate(capsys, *args) -> dict:
    assert main(["evaluate", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["images"][0]


def test_evaluate_scores_a_working_scale_prediction_against_full_resolution_truth(runs, geojsons, capsys):
    full, working = runs
    row = _evaluate(capsys, "--pred", working.path, "--truth", full.path)
    assert row["dice"] > 0.99 and row["f1"] == 1.0
    assert all(scores["dice"] > 0.98 for scores in row["per_class"].values())
    # against polygons in level-0 pixels, as a full-resolution prediction scores
    coarse = _evaluate(capsys, "--pred", working.path, "--truth", geojsons["full"])
    fine = _evaluate(capsys, "--pred", full.path, "--truth", geojsons["full"])
    assert fine["dice"] > 0.9 and abs(coarse["dice"] - fine["dice"]) < 0.005
    flipped = _evaluate(capsys, "--pred", full.path, "--truth", working.path)  # a coarse truth is upsampled too
    assert flipped["dice"] == pytest.approx(row["dice"])


def test_evaluate_refuses_shapes_that_differ_with_no_scale_known(runs, tmp_path, capsys):
    full, working = runs
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, _level0(working.path))  # no pixel size, no run record
    assert main(["evaluate", "--pred", str(plain), "--truth", str(full.path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must cover the same image" in err and "scale" in err


def test_export_places_a_working_scale_result_on_the_slide(slide, runs, full_polygons, tmp_path, capsys):
    _, working = runs
    out = tmp_path / "exported.geojson"
    assert main(["export", str(working.path), "--to", "geojson", "--out", str(out)]) == 0
    _same_place(read_annotations(out), full_polygons)
    tiles = tmp_path / "tiles"
    argv = ["export", str(working.path), "--to", "tiles", "--slide", str(slide.source), "--out", str(tiles)]
    assert main([*argv, "--tile", "256", "--overlap", "0", "--mpp", "1", "--keep", "objects"]) == 0
    meta = json.loads((tiles / "dataset.json").read_text())
    assert meta["sources"][0]["width"] == slide.level_shapes[0][1] and meta["sources"][0]["mpp"] == slide.mpp
    assert meta["tiles"] > 0


@pytest.fixture(scope="module")
def nuclei(slide, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nuclei")
    model = {"mpp": MODEL_MPP}
    full = segment_instances_slide(slide, ClassicalNuclei(**model), folder / "full.zarr", out_downsample="full")
    working = segment_instances_slide(slide, ClassicalNuclei(**model), folder / "working.zarr")
    return full, working


def test_nuclei_at_both_scales_are_the_same_nuclei_in_level0_pixels(slide, nuclei, capsys):
    full, working = nuclei
    scale = working.out_downsample
    assert scale == pytest.approx(MODEL_MPP / slide.mpp) and working.mpp == MODEL_MPP
    a, b = read_nuclei_table(full.path), read_nuclei_table(working.path)
    assert len(a) > 500 and [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b, strict=True):  # measured on the working grid at either scale
        assert abs(x["x_px"] - y["x_px"]) < scale and abs(x["y_px"] - y["y_px"]) < scale
        assert x["area_um2"] == pytest.approx(y["area_um2"]) and x["class"] == y["class"]
    assert max(r["x_px"] for r in b) < slide.level_shapes[0][1]  # level-0 pixels, not working ones
    fine = _level0(full.path)
    np.testing.assert_array_equal(_upsampled(_level0(working.path), fine.shape, scale), fine)
    row = _evaluate(capsys, "--pred", working.path, "--truth", full.path)
    assert row["f1"] == 1.0 and row["tp"] == len(a) and row["dice"] == 1.0
