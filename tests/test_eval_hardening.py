"""Hardening of evaluation and annotation reading: slide-sized polygons in bounded memory,
hostile JSON, unfinished runs, skipped features said out loud, COCO files missing a part."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import shapely
import tifffile
from scipy import ndimage
from shapely.geometry import Polygon, box

from conftest import require_shared
from napari_nephro.annotations import (
    Annotation,
    AnnotationError,
    AnnotationSet,
    PolygonLabels,
    rasterize,
    read_annotations,
    read_geojson,
    write_geojson,
    write_label_zarr,
)
from napari_nephro.annotations import raster as raster_module
from napari_nephro.cli import main
from napari_nephro.common.json_io import JSONFileError, read_json
from napari_nephro.pipelines import evaluate, evaluate_pair, export
from napari_nephro.pipelines.evaluate import _rasterized

HUBMAP_SHAPE = (18484, 13013)  # height, width of slide aaa6a05cc
MEMORY_CAP = 1536 * 2**20  # address space for the whole process; the old evaluation needed > 16 GB here


def _one_line_error(capsys, args, *needles):
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("nephro: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err and captured.out == ""
    for needle in needles:
        assert needle in err, err
    return err


def _star(path, vertices: int, centre=(6500.0, 9200.0), radius=6000.0, depth=6.0, label="Cortex"):
    """A circle-ish star: vertices alternating between two radii (a polygon of many short edges)."""
    theta = np.arange(vertices) * 2 * np.pi / vertices
    r = np.where(np.arange(vertices) % 2 == 0, radius, radius - depth)
    xy = np.c_[centre[0] + r * np.cos(theta), centre[1] + r * np.sin(theta)].round(3)
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[*xy.tolist(), xy[0].tolist()]]},
        "properties": {"classification": {"name": label}},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


# 1. slide-sized polygons: blockwise, bounded memory, same numbers


@pytest.mark.skipif(sys.platform == "win32", reason="address-space limits are set with the resource module")
def test_slide_sized_polygons_evaluate_in_bounded_memory(tmp_path):
    """The anatomical regions (98 vertices) and a 100,000-vertex star against themselves at the
    slide's size, in a process capped at 1.5 GB of address space (a single uint32 raster of
    the slide is 0.96 GB; the old code needed more than 16 GB)."""
    anatomical = require_shared("annotations", "hubmap_aaa6a05cc_anatomical.geojson")
    star = _star(tmp_path / "star.geojson", 100_000)
    script = textwrap.dedent(
        f"""
        import contextlib, io, json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_CAP}, {MEMORY_CAP}))
        from napari_nephro.cli import main
        reports = []
        for path in ({str(anatomical)!r}, {str(star)!r}):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                rc = main(["evaluate", "--pred", path, "--truth", path, "--shape", "18484,13013", "--json"])
            assert rc == 0, rc
            reports.append(json.loads(out.getvalue()))
        try:  # this process's own peak (ru_maxrss would include the parent's size at the fork)
            status = open("/proc/self/status").read()
            peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
        except OSError:
            peak = None
        print(json.dumps({{"reports": reports, "peak": peak}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    for report, objects in zip(result["reports"], (2, 1), strict=True):
        (row,) = report["images"]
        assert row["dice"] == 1.0 and row["f1"] == 1.0 and row["tp"] == row["n_true"] == objects
        assert all(s["dice"] == 1.0 for s in row["per_class"].values())
    if result["peak"] is not None:
        assert result["peak"] < 700 * 2**20  # a few blocks and the objects, not the slide


def test_blockwise_scores_equal_a_brute_force_on_the_whole_image():
    """Objects across block borders, classes, crops: the blockwise evaluation against numpy on full rasters."""
    rng = np.random.default_rng(3)
    shape = (4200, 4300)  # 3 x 3 blocks of 2048
    truth_objects, pred_objects = [], []
    for k in range(40):
        cx, cy = (2048, 2048) if k < 6 else (rng.uniform(100, 4200), rng.uniform(100, 4100))
        cx, cy = cx + rng.uniform(-150, 150), cy + rng.uniform(-150, 150)
        r = rng.uniform(20, 120)
        blob = shapely.Point(cx, cy).buffer(r, quad_segs=rng.integers(2, 9))
        label = ("normal", "global sclerosis", "segmental")[k % 3]
        truth_objects.append(Annotation(blob, label))
        if k % 5:
            moved = shapely.affinity.translate(blob, rng.uniform(-0.4, 0.4) * r, rng.uniform(-0.4, 0.4) * r)
            pred_objects.append(Annotation(moved, "glomerulus"))
    truth_set, pred_set = AnnotationSet(truth_objects), AnnotationSet(pred_objects)
    truth, pred = _rasterized(truth_set, shape, []), _rasterized(pred_set, shape, [])
    assert isinstance(truth.instances, PolygonLabels)
    row = evaluate_pair(pred, truth, crops=True)

    t, p = rasterize(truth_set, shape), rasterize(pred_set, shape)  # the whole images, in memory
    tf, pf = t > 0, p > 0
    assert row["dice"] == pytest.approx(2 * np.sum(tf & pf) / (tf.sum() + pf.sum()))
    pairs, inter = np.unique(t[tf & pf].astype(np.int64) * 1000 + p[tf & pf], return_counts=True)
    t_area, p_area = np.bincount(t.ravel()), np.bincount(p.ravel())
    iou = inter / (t_area[pairs // 1000] + p_area[pairs % 1000] - inter)
    matched = pairs[iou >= 0.5]  # above 0.5 each object matches at most one other
    assert row["tp"] == len(matched) and row["n_true"] == len(np.unique(t)) - 1
    assert row["fp"] == len(np.unique(p)) - 1 - len(matched)
    classes = np.array([0, *(truth_set.class_id(a.label) for a in truth_set)])[t]
    for i, name in enumerate(truth_set.classes, start=1):
        other = (classes != i) & (classes != 0)
        pp, tt = pf & ~other, classes == i
        expected = 2 * np.sum(pp & tt) / (pp.sum() + tt.sum())
        assert row["per_class"][name]["dice"] == pytest.approx(expected)
    for crop, sl in zip(row["crops"], [s for s in ndimage.find_objects(t) if s is not None], strict=True):
        dy, dx = round(0.25 * (sl[0].stop - sl[0].start)), round(0.25 * (sl[1].stop - sl[1].start))
        ys = slice(max(0, sl[0].start - dy), min(shape[0], sl[0].stop + dy))
        xs = slice(max(0, sl[1].start - dx), min(shape[1], sl[1].stop + dx))
        inter = np.sum(tf[ys, xs] & pf[ys, xs])
        assert crop["box"] == [xs.start, ys.start, xs.stop, ys.stop]
        assert crop["dice"] == pytest.approx(2 * inter / (tf[ys, xs].sum() + pf[ys, xs].sum()))


def test_a_zarr_prediction_is_read_block_by_block(tmp_path):
    """A whole-slide OME-Zarr stays lazy (dask) through the evaluation and scores as the polygons it came from."""
    truth = AnnotationSet([Annotation(box(100, 2000, 2300, 2100), "normal"), Annotation(box(4000, 10, 4100, 60))])
    zarr_path = write_label_zarr(PolygonLabels(truth, (2500, 4200)), tmp_path / "pred.zarr")
    write_geojson(truth, tmp_path / "truth.geojson")
    report = evaluate(zarr_path, tmp_path / "truth.geojson")
    (row,) = report["images"]
    assert row["dice"] == 1.0 and row["tp"] == 2 and report["notes"] == []


def test_rasterize_follows_the_pixel_centre_rule_exactly():
    """Every pixel whose centre is covered (inside or on an edge, holes' edges included) and no other:
    checked against shapely's exact predicate, with vertices and edges on pixel centres."""
    rng = np.random.default_rng(11)
    objects = []
    for _ in range(60):
        pts = rng.integers(0, 40, (rng.integers(3, 8), 2)) / 2  # on and between pixel centres
        shape_ = shapely.make_valid(Polygon(pts))
        hole = shapely.Point(pts.mean(axis=0)).buffer(2.5, quad_segs=2)
        shape_ = shape_.difference(hole) if shape_.area > 40 else shape_
        parts = [g for g in shapely.get_parts(shape_) if isinstance(g, Polygon) and g.area > 0]
        if parts:
            objects.append(Annotation(parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)))
    annotations = AnnotationSet(objects)
    for origin, downsample in (((0.0, 0.0), 1.0), ((-0.5, -0.5), 1.0), ((0.25, 0.0), 0.5), ((1.0, 2.0), 2.0)):
        labels = rasterize(annotations, (44, 44), origin=origin, downsample=downsample)
        expected = np.zeros((44, 44), np.uint32)
        ys, xs = np.mgrid[0:44, 0:44]
        cx, cy = origin[0] + (xs + 0.5) * downsample, origin[1] + (ys + 0.5) * downsample
        for index, ann in enumerate(annotations, start=1):  # later objects cover earlier ones
            expected[shapely.intersects_xy(ann.geometry, cx, cy)] = index
        np.testing.assert_array_equal(labels, expected)


def test_tiles_give_the_same_pixels_as_one_raster(monkeypatch):
    """Any tiling, and any cut of a spiky outline's crossings into bands, draws the same pixels."""
    star = AnnotationSet(
        [
            Annotation(Polygon(_star_ring(4000, (300.0, 260.0), 240.0, 120.0)), "a"),
            Annotation(box(10.5, 10, 330, 31.25), "b"),
        ]
    )
    whole = rasterize(star, (520, 600))
    tiled = np.zeros_like(whole)
    for y in range(0, 520, 97):
        for x in range(0, 600, 131):
            h, w = min(97, 520 - y), min(131, 600 - x)
            tiled[y : y + h, x : x + w] = rasterize(star, (h, w), origin=(x, y))
    np.testing.assert_array_equal(tiled, whole)
    monkeypatch.setattr(raster_module, "MAX_CROSSINGS", 50)  # many bands of rows
    np.testing.assert_array_equal(rasterize(star, (520, 600)), whole)


def _star_ring(vertices, centre, outer, inner):
    theta = np.arange(vertices) * 2 * np.pi / vertices
    r = np.where(np.arange(vertices) % 2 == 0, outer, inner)
    return np.c_[centre[0] + r * np.cos(theta), centre[1] + r * np.sin(theta)]


# 2. JSON a parser cannot take


@pytest.mark.parametrize("name", ["deep.geojson", "deep.json"])
def test_json_nested_too_deeply_is_one_line(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_text("[" * 200_000 + "]" * 200_000)
    _one_line_error(capsys, ["evaluate", "--pred", str(path), "--truth", str(path), "--shape", "10,10"], str(path))
    _one_line_error(capsys, ["export", str(path), "--to", "geojson", "--out", str(tmp_path / "o.geojson")], str(path))
    with pytest.raises(AnnotationError, match="nested too deeply"):
        read_annotations(path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"type": "FeatureCollection", "features": [\xff\xfe]}', "not a UTF-8 text file"),
        (b'{"type": "FeatureCollection", "features": [}', "not valid JSON (line 1"),
        (b'{"x": ' + b"7" * 5000 + b"}", "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_any_json_parse_error_is_one_line_naming_the_file(tmp_path, capsys, content, reason):
    path = tmp_path / "bad.geojson"
    path.write_bytes(content)
    _one_line_error(capsys, ["evaluate", "--pred", str(path), "--truth", str(path), "--shape", "10,10"], reason)


def test_read_json_helper(tmp_path):
    ok = tmp_path / "bom.json"
    ok.write_bytes(b'\xef\xbb\xbf{"a": [1, [2]]}')  # a byte-order mark, as some Windows tools write
    assert read_json(ok) == {"a": [1, [2]]}
    with pytest.raises(JSONFileError, match="nested more than 2 levels"):
        read_json(ok, max_depth=2)
    with pytest.raises(JSONFileError, match="no such file") as info:
        read_json(tmp_path / "none.json")
    assert info.value.path == str(tmp_path / "none.json")
    with pytest.raises(JSONFileError, match="is a folder"):
        read_json(tmp_path)

    class OwnError(Exception):
        pass

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(OwnError, match=f"^{deep}: not valid JSON: lists or objects nested too deeply"):
        read_json(deep, error=OwnError)


# 3. an unfinished `nephro segment` run


def _run_store(tmp_path, *, finish: bool):
    """A partial store written by the real run writer, with 30 of its 64 rows done."""
    from napari_nephro.inference.output import ZarrRunStore, partial_path

    out = tmp_path / "pred.zarr"
    record = {"slide": "slide.svs", "classes": {"1": "glomerulus"}, "rows": 64, "cols": 80, "name": "slide"}
    store = ZarrRunStore.create(partial_path(out), (64, 80), (0, 0), record, 0.5, mpp=1.0)
    labels = np.zeros((64, 80), np.uint8)
    labels[5:20, 10:30] = 1
    store.write(0, labels[:30])
    store.flush()
    if finish:
        store.write(30, labels[30:])
        store.flush()
        store.update(complete=True)
    tifffile.imwrite(tmp_path / "truth.tif", labels)
    return partial_path(out), tmp_path / "truth.tif"


def test_an_unfinished_run_is_refused_in_one_line(tmp_path, capsys):
    partial, truth = _run_store(tmp_path, finish=False)
    err = _one_line_error(
        capsys,
        ["evaluate", "--pred", str(partial), "--truth", str(truth)],
        "unfinished",
        "30 of 64 rows",
        "--resume",
        "nephro segment slide.svs",
        "pred.zarr",
    )
    assert str(partial) in err
    _one_line_error(
        capsys, ["export", str(partial), "--to", "geojson", "--out", str(tmp_path / "o.geojson")], "30 of 64"
    )


def test_a_complete_run_store_is_scored_as_before(tmp_path, capsys):
    partial, truth = _run_store(tmp_path, finish=True)
    assert main(["evaluate", "--pred", str(partial), "--truth", str(truth), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["images"]
    assert row["dice"] == 1.0 and row["tp"] == 1


# 4. features skipped on reading are said, not silently dropped


def _with_null_geometry(path):
    features = [
        {"type": "Feature", "geometry": None, "properties": {"classification": {"name": "normal"}}},
        {"type": "Feature", "geometry": mapping_box(10, 10, 40, 40), "properties": {}},
        {"type": "Feature", "geometry": None, "properties": {}},
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def mapping_box(x0, y0, x1, y1):
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def test_features_without_geometry_are_noted(tmp_path):
    path = _with_null_geometry(tmp_path / "a.geojson")
    annotations = read_geojson(path)
    assert len(annotations) == 1
    assert annotations.warnings == ["2 features without geometry were skipped (numbers 0, 2, counting from 0)"]

    notes = []
    report = evaluate(path, path, shape=(64, 64), on_note=notes.append)
    assert report["images"][0]["dice"] == 1.0
    assert (
        notes
        == report["notes"]
        == [f"{path}: 2 features without geometry were skipped (numbers 0, 2, counting from 0)"]
    )

    notes = []
    export(path, "geojson", tmp_path / "out.geojson", on_note=notes.append)
    assert len(notes) == 1 and "2 features without geometry were skipped" in notes[0] and "a.geojson" in notes[0]


def test_many_notes_of_one_file_are_cut_short(tmp_path):
    features = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [i, i]}} for i in range(9)]
    features.append({"type": "Feature", "geometry": mapping_box(1, 1, 9, 9)})
    path = tmp_path / "points.geojson"
    path.write_text(json.dumps(features))
    notes = []
    evaluate(path, path, shape=(16, 16), on_note=notes.append)
    assert len(notes) == 6 and notes[-1].endswith("4 more notes like these")


# 5. COCO files missing a part


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        ("images", 'COCO file without "images" (it has "annotations" and "categories")'),
        ("categories", 'COCO file without "categories" (it has "images" and "annotations")'),
        ("annotations", 'COCO file without "annotations"'),
    ],
)
def test_coco_without_a_part_says_which(tmp_path, capsys, missing, expected):
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 20}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 9, 1, 9, 9]]}],
        "categories": [{"id": 1, "name": "glomerulus"}],
    }
    del coco[missing]
    path = tmp_path / "x.json"
    path.write_text(json.dumps(coco))
    err = _one_line_error(capsys, ["evaluate", "--pred", str(path), "--truth", str(path)], expected)
    assert "not GeoJSON" not in err
    _one_line_error(capsys, ["export", str(path), "--to", "geojson", "--out", str(tmp_path / "o.geojson")], expected)
    with pytest.raises(AnnotationError, match="COCO file without"):
        read_annotations(path)


def test_coco_parts_of_the_wrong_kind_are_one_line(tmp_path, capsys):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"images": {}, "annotations": [], "categories": []}))
    _one_line_error(capsys, ["evaluate", "--pred", str(path), "--truth", str(path)], 'COCO "images" must be a list')
