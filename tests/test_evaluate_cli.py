"""`nephro evaluate` on the real annotated sets, and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from conftest import require_shared
from napari_nephro.annotations import rasterize, read_coco
from napari_nephro.cli import main


def _json(capsys, *args):
    assert main(["evaluate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_nuclei_against_themselves_score_perfectly(capsys):
    truth = require_shared("nuclei", "miccai2015_tcga", "image02_labels.tif")
    report = _json(capsys, "--pred", str(truth), "--truth", str(truth))
    (row,) = report["images"]
    count = len(np.unique(tifffile.imread(truth))) - 1  # counted independently of the package
    assert row["dice"] == 1.0 and row["f1"] == 1.0 and row["tp"] == row["n_true"] == count == 127


def test_a_shrunken_prediction_folder_matches_an_independent_count(tmp_path, capsys):
    folder = require_shared("nuclei", "miccai2015_tcga")
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    expected = {}
    for path in sorted(folder.glob("*_labels.tif"))[:3]:
        truth = tifffile.imread(path)
        pred = ndimage.grey_erosion(truth, size=5)
        tifffile.imwrite(pred_dir / path.name, pred)
        inter = np.sum((pred > 0) & (truth > 0))
        expected[path.stem.removesuffix("_labels")] = 2 * inter / (np.sum(pred > 0) + np.sum(truth > 0))
    report = _json(capsys, "--pred", str(pred_dir), "--truth", str(folder), "--per-crop")
    assert {r["image"]: pytest.approx(r["dice"]) for r in report["images"]} == expected
    assert report["summary"]["dice"]["n"] == 3 and all(r["crops"] for r in report["images"])


def test_coco_truth_against_a_folder_of_label_images(tmp_path, capsys):
    coco = require_shared("glomeruli", "bupt_multistain_dev", "annotations.json")
    images = read_coco(coco)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for entry in list(images.values())[:5]:
        tifffile.imwrite(pred_dir / f"{entry.stem}.tif", rasterize(entry.annotations, (entry.height, entry.width)))
    report = _json(capsys, "--pred", str(pred_dir), "--truth", str(coco))
    assert len(report["images"]) == 5
    counts = {entry.stem: len(entry.annotations) for entry in images.values()}
    assert sum(counts[row["image"]] for row in report["images"]) > 0
    for row in report["images"]:
        n = counts[row["image"]]
        assert row["tp"] == row["n_true"] == n and row["fp"] == 0
        assert row["f1"] == (1.0 if n else None) and row["dice"] == (1.0 if n else None)
        assert set(row["per_class"]) == {"gl", "gn", "gm", "gs"}


def test_table_output_reports_undefined_as_a_dash(tmp_path, capsys):
    empty = tmp_path / "empty.tif"
    tifffile.imwrite(empty, np.zeros((20, 20), np.uint16))
    assert main(["evaluate", "--pred", str(empty), "--truth", str(empty)]) == 0
    out = capsys.readouterr().out
    assert "empty" in out and " -" in out and "undefined" in out


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("shapes", "must cover the same image"),
        ("missing", "no such file"),
        ("no common", "no file stem in common"),
        ("bad iou", "argument --iou: must be in (0, 1], not 1.5"),
        ("polygons only", "need an image size"),
    ],
)
def test_evaluate_refusals_are_one_line(tmp_path, capsys, setup, reason):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    tifffile.imwrite(a, np.zeros((10, 10), np.uint16))
    tifffile.imwrite(b, np.zeros((10, 12), np.uint16))
    args = {
        "shapes": ["--pred", str(a), "--truth", str(b)],
        "missing": ["--pred", str(tmp_path / "x.tif"), "--truth", str(b)],
        "no common": ["--pred", str(tmp_path), "--truth", str(require_shared("nuclei", "miccai2015_tcga"))],
        "bad iou": ["--pred", str(a), "--truth", str(a), "--iou", "1.5"],
        "polygons only": [
            "--pred",
            str(require_shared("annotations", "hubmap_aaa6a05cc_glomeruli.geojson")),
            "--truth",
            str(require_shared("annotations", "hubmap_aaa6a05cc_glomeruli.geojson")),
        ],
    }[setup]
    assert main(["evaluate", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and reason in captured.err


def test_ome_zarr_truth_with_classes_against_an_imagescope_prediction(tmp_path, capsys):
    from shapely.geometry import box

    from napari_nephro.annotations import (
        Annotation,
        AnnotationSet,
        PolygonLabels,
        write_imagescope_xml,
        write_label_zarr,
    )

    truth = AnnotationSet(
        [Annotation(box(10, 10, 50, 50), "normal"), Annotation(box(100, 100, 160, 140), "global sclerosis")]
    )
    write_label_zarr(PolygonLabels(truth, (200, 240)), tmp_path / "truth.zarr")
    pred = AnnotationSet([Annotation(box(10, 10, 50, 60), "glomerulus")])  # finds the normal one, misses the other
    write_imagescope_xml(pred, tmp_path / "pred.xml")
    report = _json(capsys, "--pred", str(tmp_path / "pred.xml"), "--truth", str(tmp_path / "truth.zarr"))
    (row,) = report["images"]
    assert (row["tp"], row["fp"], row["fn"]) == (1, 0, 1)
    assert row["per_class"]["normal"]["dice"] == pytest.approx(2 * 1600 / (1600 + 2000))
    assert row["per_class"]["global sclerosis"]["dice"] == 0.0


def test_polygon_truth_takes_its_size_from_a_label_image_prediction(tmp_path, capsys):
    from shapely.geometry import box

    from napari_nephro.annotations import Annotation, AnnotationSet, write_geojson

    write_geojson(AnnotationSet([Annotation(box(10, 10, 30, 40), "normal")]), tmp_path / "truth.geojson")
    pred = np.zeros((60, 80), np.uint16)
    pred[10:40, 10:30] = 4
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    (row,) = _json(capsys, "--pred", str(tmp_path / "pred.tif"), "--truth", str(tmp_path / "truth.geojson"))["images"]
    assert row["dice"] == 1.0 and row["tp"] == 1


def test_two_files_for_one_image_are_refused_not_overwritten(tmp_path, capsys):
    folder = tmp_path / "pred"
    folder.mkdir()
    labels = np.zeros((20, 20), np.uint8)
    labels[2:8, 2:8] = 1
    tifffile.imwrite(folder / "x.tif", labels)
    Image.fromarray(np.zeros_like(labels)).save(folder / "x.png")  # two label files for one image: which one?
    tifffile.imwrite(tmp_path / "x.tif", labels)
    assert main(["evaluate", "--pred", str(folder), "--truth", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "x.png and x.tif are both for image 'x'" in err and err.count("\n") == 1
    (folder / "x.png").unlink()  # an image beside its labels (x.png + x_labels.tif) is no conflict:
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(folder / "x.png")  # the labels are scored
    (folder / "x.tif").rename(folder / "x_labels.tif")
    (row,) = _json(capsys, "--pred", str(folder), "--truth", str(tmp_path / "x.tif"))["images"]
    assert row["dice"] == 1.0
