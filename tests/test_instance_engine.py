"""The instance engine: one set of nuclei whatever the tiling, unique ids, resumable slide runs, every output.

The oracle is a deterministic classical segmenter (tests/nuclei_oracle.py) run on
whole real images and through the tiled engine: the engine must give back exactly
the whole-image nuclei, none split at a tile border, none counted twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from conftest import require_shared
from napari_nephro.evaluation.instances import match_instances
from napari_nephro.inference import SegmentError
from napari_nephro.inference.instance_api import (
    read_nuclei_table,
    segment_instances_region,
    segment_instances_slide,
)
from napari_nephro.inference.instance_output import write_region_outputs
from napari_nephro.io import open_slide
from napari_nephro.tiling import read_scaled
from nuclei_oracle import ClassicalNuclei, classical_nuclei

MONUSEG = ("test", "TCGA-2Z-A9J9-01A-01-TS1"), ("train", "TCGA-21-5784-01Z-00-DX1"), ("test", "TCGA-69-7764-01A-01-TS1")


def monuseg(split: str, name: str):
    return open_slide(require_shared("nuclei", "monuseg_nonhidden", split, "images", f"{name}.png"), mpp=0.25)


def whole_image_nuclei(slide, mpp: float = 0.5) -> np.ndarray:
    """The oracle on the whole image, read at the model's scale exactly as the engine reads its tiles."""
    from napari_nephro.inference.plan import cells

    h, w = slide.level_shapes[0]
    s = mpp / slide.mpp
    rows, cols = cells(h, s), cells(w, s)  # the working grid's pixels, laid from the corner as the tiles are
    return classical_nuclei(read_scaled(slide, (0, 0, cols * s, rows * s), (rows, cols)))


def assert_same_nuclei(tiled: np.ndarray, whole: np.ndarray) -> None:
    result = match_instances(tiled.astype(np.int64), whole.astype(np.int64), 0.95)
    counts = (result.n_true, result.tp, result.fp, result.fn)
    assert counts[0] > 50
    assert counts == (counts[0], counts[0], 0, 0)


@pytest.mark.shared
@pytest.mark.parametrize(("tile", "overlap"), [(256, 64), (192, 96), (320, 80)])
def test_tiled_nuclei_equal_the_whole_image_nuclei_for_any_tiling(tile, overlap):
    for split, name in MONUSEG:
        slide = monuseg(split, name)
        whole = whole_image_nuclei(slide)
        result = segment_instances_region(
            slide, ClassicalNuclei(tile_size=tile, overlap=overlap), out_downsample=2.0, skip_background=False
        )
        assert result.array.shape == whole.shape
        assert_same_nuclei(result.array, whole)
        ids = np.unique(result.array)
        ids = ids[ids != 0]
        assert ids.tolist() == sorted(n.id for n in result.nuclei)  # one id per nucleus, none shared, none lost
        boxes = ndimage.find_objects(result.array.astype(np.int64))
        for n in result.nuclei:  # each centroid (level 0) lies within its own object's box (working grid)
            ys, xs = boxes[n.id - 1]
            assert ys.start <= n.y / 2 <= ys.stop and xs.start <= n.x / 2 <= xs.stop


@pytest.mark.shared
def test_without_a_halo_nuclei_at_tile_borders_are_lost_and_the_oracle_sees_it():
    slide = monuseg(*MONUSEG[0])
    whole = whole_image_nuclei(slide)
    model = ClassicalNuclei(tile_size=100, overlap=0)
    result = segment_instances_region(slide, model, out_downsample=2.0, skip_background=False)
    missed = match_instances(result.array.astype(np.int64), whole.astype(np.int64), 0.95).fn
    assert missed > 5


@pytest.mark.shared
def test_nuclei_at_the_slide_resolution_carry_table_and_summary():
    slide = monuseg(*MONUSEG[2])
    result = segment_instances_region(slide, ClassicalNuclei(), skip_background=False)
    assert result.array.shape == slide.level_shapes[0] and result.array.dtype == np.uint32
    assert result.mpp == pytest.approx(0.25)
    areas = np.bincount(result.array.ravel().astype(np.int64))
    for n in result.nuclei[::20]:  # area in um2 from the working grid, at the output's 4 px per working px
        assert areas[n.id] * 0.25**2 == pytest.approx(n.area_um2, rel=0.01)
    summary = result.summary
    assert summary.total == len(result.nuclei) and summary.counts["small"] + summary.counts["large"] == summary.total
    assert summary.tissue_mm2 is None  # glass was not looked for
    assert "nuclei" in summary.line()


@pytest.mark.shared
def test_region_nuclei_as_qupath_detections_and_a_table(tmp_path):
    from napari_nephro.annotations import read_annotations

    slide = monuseg(*MONUSEG[0])
    result = segment_instances_region(slide, ClassicalNuclei(), polygons=True, skip_background=False)
    geo = write_region_outputs(result.nuclei, tmp_path / "n.geojson", result.classes, 0.25, "test")
    data = json.loads(geo.read_text())
    assert len(data["features"]) == len(result.nuclei)
    props = data["features"][0]["properties"]
    assert props["objectType"] == "detection" and props["classification"]["name"] in ("small", "large")
    assert {"Object id", "Area µm^2", "Score"} <= set(props["measurements"])
    back = read_annotations(geo)
    assert len(back) == len(result.nuclei)
    # an outline covers its object's pixels at level 0: polygon area equals the pixel count
    by_id = {n.id: n for n in result.nuclei}
    counts = np.bincount(result.array.ravel().astype(np.int64))
    for feature, ann in list(zip(data["features"], back, strict=True))[::30]:
        assert ann.geometry.area == pytest.approx(counts[feature["properties"]["measurements"]["Object id"]], rel=0.02)
    table = write_region_outputs(result.nuclei, tmp_path / "n.csv", result.classes, 0.25, "test")
    rows = read_nuclei_table(table)
    assert [r["id"] for r in rows] == sorted(by_id)
    first = rows[0]
    assert first["x_um"] == pytest.approx(by_id[first["id"]].x * 0.25, abs=0.01)
    with pytest.raises(SegmentError, match="already exists"):
        write_region_outputs(result.nuclei, table, result.classes, 0.25, "test")


@pytest.fixture(scope="module")
def cmu():
    return open_slide(require_shared("wsi", "CMU-1-Small-Region.svs"))


@pytest.fixture(scope="module")
def uninterrupted(cmu, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "nuclei.zarr"
    result = segment_instances_slide(cmu, ClassicalNuclei(), out)
    assert result.path == out and result.summary.total > 100
    return out, result


def _labels(path: Path) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(str(path), mode="r")["0"])


@pytest.mark.shared
def test_a_whole_slide_run_writes_a_uint32_pyramid_with_its_table_inside(cmu, uninterrupted):
    from napari_nephro.annotations.omezarr import read_label_zarr
    from napari_nephro.inference.plan import cells

    out, result = uninterrupted
    labels = _labels(out)
    scale = 0.5 / cmu.mpp  # written at the model's working scale by default
    assert labels.dtype == np.uint32 and labels.shape == tuple(cells(n, scale) for n in cmu.level_shapes[0])
    rows = read_nuclei_table(out)
    assert len(rows) == result.summary.total == len(np.unique(labels)) - 1
    assert result.summary.tissue_mm2 > 0 and result.summary.density_per_mm2 > 0
    pyramid = read_label_zarr(out)  # the readers take it as a label image
    assert len(pyramid.levels) >= 2


@pytest.mark.shared
def test_a_cancelled_slide_run_resumes_to_the_same_nuclei(cmu, uninterrupted, tmp_path):
    out = tmp_path / "nuclei.zarr"
    model = ClassicalNuclei()
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 12

    first = segment_instances_slide(cmu, model, out, batch_size=2, cancel=cancel)
    assert first.path is None and 0 < first.rows_done < first.rows
    second = segment_instances_slide(cmu, ClassicalNuclei(), out, batch_size=2, resume=True)
    assert second.path == out
    assert np.array_equal(_labels(out), _labels(uninterrupted[0]))
    assert read_nuclei_table(out) == read_nuclei_table(uninterrupted[0])


_KILLED_RUN = """
import sys, time
sys.path.insert(0, {tests!r})
from nuclei_oracle import ClassicalNuclei
from napari_nephro.io import open_slide
from napari_nephro.inference.instance_api import segment_instances_slide

class Slow(ClassicalNuclei):
    def predict_instances(self, tiles):
        time.sleep(0.05)
        return super().predict_instances(tiles)

segment_instances_slide(open_slide({slide!r}), Slow(), {out!r}, batch_size=2)
"""


@pytest.mark.shared
def test_a_killed_slide_run_resumes_to_the_same_nuclei_in_every_output(cmu, uninterrupted, tmp_path):
    from napari_nephro.inference import partial_path

    out = tmp_path / "nuclei.geojson"
    code = _KILLED_RUN.format(tests=str(Path(__file__).parent), slide=str(cmu.source), out=str(out))
    child = subprocess.Popen([sys.executable, "-c", code])
    partial = partial_path(out)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it once some rows are on disk
        record = partial / ".zattrs"
        if record.exists() and '"rows_done": 0,' not in record.read_text() and '"rows_done"' in record.read_text():
            break
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not out.exists() and partial.exists()
    result = segment_instances_slide(cmu, ClassicalNuclei(), out, batch_size=2, resume=True)
    assert result.path == out
    features = json.loads(out.read_text())["features"]
    ids = [f["properties"]["measurements"]["Object id"] for f in features]
    reference = read_nuclei_table(uninterrupted[0])
    assert ids == [r["id"] for r in reference]  # same nuclei, same ids, none doubled by the restart
    assert [f["properties"]["classification"]["name"] for f in features] == [r["class"] for r in reference]


@pytest.mark.shared
def test_slide_outputs_as_csv_and_the_refusals(cmu, uninterrupted, tmp_path):
    out = tmp_path / "nuclei.csv"
    result = segment_instances_slide(cmu, ClassicalNuclei(), out, region=(0, 0, 1200, 900))
    rows = read_nuclei_table(out)
    assert len(rows) == result.summary.total > 10
    assert all(r["x_px"] < 1200 + 40 and r["y_px"] < 900 + 40 for r in rows)
    with pytest.raises(SegmentError, match="already exists"):
        segment_instances_slide(cmu, ClassicalNuclei(), out, region=(0, 0, 1200, 900))
    with pytest.raises(SegmentError, match=r"\.zarr \(labels\), \.geojson"):
        segment_instances_slide(cmu, ClassicalNuclei(), tmp_path / "nuclei.png")
    partial = tmp_path / "other.zarr"
    segment_instances_slide(cmu, ClassicalNuclei(), partial, cancel=lambda: True)
    other = ClassicalNuclei()
    other.fingerprint = "another model"
    with pytest.raises(SegmentError, match="different model"):
        segment_instances_slide(cmu, other, partial, resume=True)
    with pytest.raises(SegmentError, match="not an instance model"):
        from napari_nephro.models import TorchSegmenter

        segment_instances_region(cmu, TorchSegmenter.from_checkpoint("default"))


class PerTileThreshold(ClassicalNuclei):
    """The oracle with its threshold taken from each tile's own pixels, as real models normalise per tile:
    a nucleus by a core's edge may then come out a little different in its two tiles."""

    def predict_instances(self, tiles):
        from skimage.color import rgb2hed

        from napari_nephro.models.instances import TileInstances

        out = []
        for tile in tiles:
            threshold = float(np.percentile(rgb2hed(tile)[..., 0], 80))
            out.append(TileInstances.from_labels(classical_nuclei(tile, threshold=threshold, max_extent=40)))
        return out


@pytest.mark.shared
def test_a_model_that_sees_each_tile_differently_still_gives_each_nucleus_once():
    for split, name in MONUSEG:
        slide = monuseg(split, name)
        result = segment_instances_region(
            slide, PerTileThreshold(tile_size=192, overlap=64), out_downsample=2.0, skip_background=False
        )
        painted = np.bincount(result.array.ravel().astype(np.int64), minlength=max(n.id for n in result.nuclei) + 1)
        for n in result.nuclei:  # every row of the table is on the image, with the pixels it says it has
            assert painted[n.id] * 0.5**2 == pytest.approx(n.area_um2)
            assert painted[n.id] > 0


@pytest.mark.shared
def test_the_whole_slide_run_equals_the_oracle_on_the_whole_slide(cmu, uninterrupted, tmp_path):
    from napari_nephro.inference.instance_engine import NearestRows
    from napari_nephro.inference.plan import cells

    whole = whole_image_nuclei(cmu)  # at 0.5 um/px: the working grid, where the output is by default
    assert_same_nuclei(_labels(uninterrupted[0]), whole)
    height, width = cmu.level_shapes[0]
    scale = 0.5 / cmu.mpp
    work = (cells(height, scale), cells(width, scale))
    assert whole.shape == work
    rows = NearestRows(work, (height, width), 1 / scale, 0)
    _, at_level0 = rows.push(0, whole)
    full = segment_instances_slide(cmu, ClassicalNuclei(), tmp_path / "full.zarr", out_downsample="full")
    assert_same_nuclei(_labels(full.path), at_level0)  # at the slide's 0.499 um/px on request


@pytest.mark.shared
def test_a_run_stopped_while_its_output_is_made_resumes(cmu, uninterrupted, tmp_path, monkeypatch):
    import napari_nephro.inference.instance_api as api

    real = api.finish_instances

    def interrupted(store, out):
        raise KeyboardInterrupt

    out = tmp_path / "nuclei.geojson"
    monkeypatch.setattr(api, "finish_instances", interrupted)
    with pytest.raises(KeyboardInterrupt):
        segment_instances_slide(cmu, ClassicalNuclei(), out, batch_size=2)
    monkeypatch.setattr(api, "finish_instances", real)
    result = segment_instances_slide(cmu, ClassicalNuclei(), out, batch_size=2, resume=True)
    assert result.path == out
    ids = [f["properties"]["measurements"]["Object id"] for f in json.loads(out.read_text())["features"]]
    assert ids == [r["id"] for r in read_nuclei_table(uninterrupted[0])]


@pytest.mark.shared
def test_a_resumed_run_drops_the_same_doubled_nuclei_as_an_uninterrupted_one(cmu, tmp_path):
    model = PerTileThreshold(tile_size=192, overlap=64)
    whole = segment_instances_slide(cmu, model, tmp_path / "whole.zarr")
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 30

    out = tmp_path / "resumed.zarr"
    assert segment_instances_slide(cmu, model, out, cancel=cancel).path is None
    segment_instances_slide(cmu, model, out, resume=True)
    assert np.array_equal(_labels(out), _labels(whole.path))
    assert read_nuclei_table(out) == read_nuclei_table(whole.path)


@pytest.mark.shared
def test_an_overlap_below_the_models_halo_is_refused(cmu):
    with pytest.raises(SegmentError, match="less than the model's halo of 64 px"):
        segment_instances_region(cmu, ClassicalNuclei(), (0, 0, 500, 500), overlap=16)
