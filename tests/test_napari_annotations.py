"""Annotations and comparison inside napari: the reader, and the Compare widget."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import require_shared
from napari_nephro.plugin.widgets.compare import CompareWidget


def test_geojson_opens_as_shapes_aligned_with_the_open_slide(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open(str(require_shared("wsi", "CMU-1-Small-Region.svs")), plugin="napari-nephro")
    (layer,) = viewer.open(
        str(require_shared("annotations", "hubmap_aaa6a05cc_glomeruli.geojson")), plugin="napari-nephro"
    )
    assert layer.nshapes == 96 and set(layer.features["class"]) == {"glomerulus"}
    np.testing.assert_allclose(layer.scale, (0.499, 0.499))  # same scale as the slide layer


def test_broken_annotation_file_is_one_notification(make_napari_viewer, tmp_path, notifications):
    shown = notifications
    viewer = make_napari_viewer()
    bad = tmp_path / "broken.geojson"
    bad.write_text("{oops")
    assert viewer.open(str(bad), plugin="napari-nephro") == []
    assert len(shown) == 1 and "broken.geojson" in shown[0] and "not valid JSON" in shown[0]


@pytest.fixture
def compare(make_napari_viewer):
    viewer = make_napari_viewer()
    truth = np.zeros((60, 80), np.uint16)
    truth[5:20, 5:20] = 1
    truth[30:50, 40:60] = 2
    pred = np.zeros_like(truth)
    pred[5:20, 6:21] = 7  # overlaps object 1 well
    pred[0:4, 70:78] = 8  # a false positive
    viewer.add_labels(pred, name="prediction", scale=(0.5, 0.5), units=("um", "um"))
    viewer.add_labels(truth, name="truth", scale=(0.5, 0.5), units=("um", "um"))
    _, widget = viewer.window.add_plugin_dock_widget("napari-nephro", "Compare")
    assert isinstance(widget, CompareWidget)
    return viewer, widget, pred, truth


def test_compare_adds_a_green_yellow_red_layer_and_a_table(compare):
    viewer, widget, _, _ = compare
    widget.pred_combo.setCurrentText("prediction")
    widget.truth_combo.setCurrentText("truth")
    widget.compare_button.click()
    layer = viewer.layers["TP/FP/FN: prediction vs truth"]
    np.testing.assert_array_equal(np.unique(layer.data), [0, 1, 2, 3])
    assert tuple(layer.colormap.map(1)[:3]) == pytest.approx((0, 200 / 255, 0))  # TP green
    assert tuple(layer.colormap.map(2)[:3]) == pytest.approx((1, 220 / 255, 0))  # FP yellow
    assert tuple(layer.colormap.map(3)[:3]) == pytest.approx((230 / 255, 0, 0))  # FN red
    np.testing.assert_allclose(layer.scale, (0.5, 0.5))
    assert "TP 1, FP 1, FN 1" in widget.summary.text()
    outcomes = sorted((r["side"], r["outcome"]) for r in widget.rows)
    assert outcomes == [("prediction", "FP"), ("prediction", "TP"), ("truth", "FN"), ("truth", "TP")]
    assert widget.csv_text().splitlines()[0].startswith("side,id,class")
    fn_row = next(i for i, r in enumerate(widget.rows) if r["outcome"] == "FN")
    widget.jump_to_row(fn_row)
    from napari_nephro.plugin.widgets.compare import _camera

    np.testing.assert_allclose(_camera(viewer).center[-2:], (39.5 * 0.5, 49.5 * 0.5))


def test_compare_refuses_layers_of_different_shapes(compare):
    viewer, widget, *_ = compare
    viewer.add_labels(np.zeros((10, 10), np.uint8), name="small")
    widget.pred_combo.setCurrentText("small")
    widget.truth_combo.setCurrentText("truth")
    widget.compare_button.click()
    assert "differ in shape" in widget.summary.text()
    assert not any(layer.name.startswith("TP/FP/FN") for layer in viewer.layers)


def test_compare_saves_the_table_without_replacing_a_file_unasked(compare, tmp_path):
    viewer, widget, _, _ = compare
    viewer.layers["truth"].metadata["classes"] = {1: "normal", 2: "global sclerosis"}
    widget.compare_button.click()
    target = tmp_path / "objects.csv"
    assert widget.save_csv(target)
    assert target.read_bytes() == widget.csv_text().encode() and len(target.read_text().splitlines()) == 1 + len(
        widget.rows
    )
    with open(target, newline="") as fh:
        rows = {(r["side"], r["id"]): r for r in csv.DictReader(fh)}
    # truth 1 is 15 x 15 px at 0.5 um/px; the prediction is shifted one column: IoU 210 / 240 = 0.875
    first = rows[("truth", "1")]
    assert (first["class"], first["area_px"], first["area_um2"], first["matched_id"]) == ("normal", "225", "56.25", "7")
    assert float(first["iou"]) == 0.875 and first["outcome"] == "TP"
    assert rows[("truth", "2")]["class"] == "global sclerosis" and rows[("truth", "2")]["outcome"] == "FN"
    assert rows[("prediction", "7")]["class"] == "normal" and rows[("prediction", "8")]["outcome"] == "FP"
    target.write_text("mine")
    assert not widget.save_csv(target)
    assert target.read_text() == "mine" and "already exists" in widget.summary.text()


def test_compare_whole_slide_layers_at_a_coarser_level(make_napari_viewer, monkeypatch):
    import napari_nephro.plugin.widgets.compare as compare_module

    monkeypatch.setattr(compare_module, "MAX_PIXELS", 64 * 64)  # a "whole slide" of 128 x 128
    truth = np.zeros((128, 128), np.uint8)
    truth[16:48, 16:48] = 1
    truth[80:112, 80:120] = 2
    pred = np.zeros_like(truth)
    pred[16:48, 20:52] = 3
    viewer = make_napari_viewer()
    viewer.add_labels([pred, pred[::2, ::2]], name="prediction", multiscale=True, scale=(0.5, 0.5))
    viewer.add_labels(truth, name="truth", scale=(0.5, 0.5))
    _, widget = viewer.window.add_plugin_dock_widget("napari-nephro", "Compare")
    widget.pred_combo.setCurrentText("prediction")
    widget.truth_combo.setCurrentText("truth")
    widget.compare_button.click()
    assert "1/2 resolution" in widget.summary.text() and "TP 1, FP 0, FN 1" in widget.summary.text()
    layer = viewer.layers["TP/FP/FN: prediction vs truth"]
    assert layer.data.shape == (64, 64)
    np.testing.assert_allclose(layer.scale, (1.0, 1.0))  # lies on the slide where the objects are
    fn_row = next(i for i, r in enumerate(widget.rows) if r["outcome"] == "FN")
    widget.jump_to_row(fn_row)
    np.testing.assert_allclose(compare_module._camera(viewer).center[-2:], (95.0 * 0.5, 99.0 * 0.5), atol=0.6)
