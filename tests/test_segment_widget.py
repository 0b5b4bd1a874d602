"""The Segment dock widget in napari: a rectangle, the field of view, the whole slide, cancel and resume."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from qtpy.QtWidgets import QApplication

from napari_nephro.cli import main
from napari_nephro.inference import partial_path
from napari_nephro.inference.objects import ObjectRules
from napari_nephro.inference.plan import cells
from napari_nephro.inference.summary import ObjectSummary, summarize
from napari_nephro.io import open_slide
from napari_nephro.plugin.layers import slide_layer_data
from napari_nephro.plugin.widgets.segment import SegmentWidget
from napari_nephro.sample import SAMPLE_MPP, SAMPLE_SHAPE, sample_slide_path


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "unet-small"
    args = ["model", "init", "--arch", "unet", "--encoder", "resnet18", "--out", str(out)]
    assert main([*args, "--tile", "512", "--overlap", "128", "--input", "128"]) == 0
    return out


@pytest.fixture
def widget(make_napari_viewer, small_checkpoint):
    viewer = make_napari_viewer()
    data, kwargs, _ = slide_layer_data(open_slide(sample_slide_path()))
    viewer.add_image(data, **kwargs)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model_edit.setText(str(small_checkpoint))
    widget._describe_model()
    return widget


def run_and_wait(widget, qtbot, timeout=120_000):
    seen = []
    widget.progressed.connect(lambda p: seen.append((p.done, widget._worker is not None)))
    widget.run()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=timeout)
    return seen


def test_a_rectangle_becomes_an_aligned_labels_layer(widget, qtbot):
    viewer = widget.viewer
    assert "unet" in widget.model_info.text() and "512 px tiles" in widget.model_info.text()
    x0, y0, x1, y1 = 1000, 800, 1600, 1200  # level-0 pixels
    viewer.add_shapes([np.array([[y0, x0], [y1, x1]]) * SAMPLE_MPP], shape_type="rectangle", name="roi")
    widget.where_combo.setCurrentText("Shapes rectangle")
    progress = run_and_wait(widget, qtbot)
    assert progress, "progress must reach the GUI while the worker runs"
    layer = widget.result_layer
    assert layer is not None and layer.name == "unet-small segmentation", widget.status.text()
    assert layer.data.shape == (y1 - y0, x1 - x0)
    slide_layer = viewer.layers[0]
    np.testing.assert_allclose(layer.scale, slide_layer.scale)
    # the label pixel (0, 0) lies over slide pixel (y0, x0), and the far corner over the far corner
    np.testing.assert_allclose(slide_layer.world_to_data(layer.data_to_world((0, 0))), (y0, x0))
    np.testing.assert_allclose(slide_layer.world_to_data(layer.data_to_world((399, 599))), (y1 - 1, x1 - 1))
    assert list(layer.features["class"]) == ["glomerulus"]
    assert "Done" in widget.status.text()
    found = summarize(layer.data, SAMPLE_MPP, {1: "glomerulus"}).describe()  # what the layer holds, in words
    assert found[0].upper() + found[1:] in widget.status.text()


def test_the_field_of_view_is_what_is_on_screen(widget, qtbot):
    viewer = widget.viewer
    camera = viewer.scene.camera
    camera.center = (1000 * SAMPLE_MPP, 1500 * SAMPLE_MPP)
    camera.zoom = 2 / SAMPLE_MPP  # 2 screen pixels per level-0 pixel: a small part of the slide
    height, width = viewer.canvas.size
    x, y, w, h = widget.region(viewer.layers[0])
    assert (w, h) == pytest.approx((width / 2, height / 2))
    assert (x + w / 2, y + h / 2) == pytest.approx((1500, 1000))
    run_and_wait(widget, qtbot)
    layer = widget.result_layer
    assert layer is not None, widget.status.text()
    np.testing.assert_allclose(viewer.layers[0].world_to_data(layer.data_to_world((0, 0))), (y, x), atol=1)


def test_whole_slide_gives_a_multiscale_layer_and_cancel_then_resume(widget, qtbot, tmp_path):
    out = tmp_path / "whole.zarr"
    widget.where_combo.setCurrentText("whole slide")
    widget.out_edit.setText(str(out))
    segmenter = widget.segmenter()
    real_predict = segmenter.predict

    def slow(tiles):
        time.sleep(0.3)
        return real_predict(tiles)

    segmenter.predict = slow
    widget.progressed.connect(lambda p: widget.cancel() if p.done >= 4 else None)  # after the first batch
    run_and_wait(widget, qtbot)
    assert "Cancelled" in widget.status.text() and partial_path(out).exists() and not out.exists()
    assert widget.result_layer is None

    widget.progressed.disconnect()
    widget.progressed.connect(widget._show_progress)
    run_and_wait(widget, qtbot)
    layer = widget.result_layer
    assert layer is not None and out.exists() and not partial_path(out).exists(), widget.status.text()
    # at the model's scale (1 um/px) by default, over the slide's whole extent in um
    scale = 1.0 / SAMPLE_MPP
    assert layer.multiscale and layer.data[0].shape == tuple(cells(n, scale) for n in SAMPLE_SHAPE)
    slide_layer = widget.viewer.layers[0]
    np.testing.assert_allclose(layer.scale, np.asarray(slide_layer.scale) * scale)
    np.testing.assert_allclose(layer.extent.world, slide_layer.extent.world, atol=layer.scale[-1])


def test_whole_slide_at_full_resolution_when_asked(widget, qtbot, tmp_path):
    out = tmp_path / "full.zarr"
    widget.where_combo.setCurrentText("whole slide")
    widget.out_edit.setText(str(out))
    widget.full_check.setChecked(True)
    run_and_wait(widget, qtbot)
    layer = widget.result_layer
    assert layer is not None and layer.data[0].shape == SAMPLE_SHAPE, widget.status.text()
    np.testing.assert_allclose(layer.scale, widget.viewer.layers[0].scale)


def test_mistakes_are_shown_not_raised(widget, qtbot, tmp_path):
    widget.where_combo.setCurrentText("Shapes rectangle")
    widget.run()
    assert "draw a rectangle" in widget.status.text() and widget.run_button.isEnabled()
    widget.model_edit.setText(str(tmp_path))
    widget._describe_model()
    assert "not a checkpoint folder" in widget.model_info.text()
    widget.where_combo.setCurrentText("whole slide")
    widget.run()  # the model is read in the worker: napari does not wait on a large checkpoint
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=30_000)
    assert "not a checkpoint folder" in widget.status.text()


def test_the_model_description_wraps_within_the_dock_and_its_tooltip_holds_all_of_it(widget, tmp_path):
    """A long description (here: a long folder that is not a model) wraps instead of widening or clipping."""
    folder = tmp_path / ("a_folder_with_a_name_much_longer_than_any_dock_is_wide_" * 2)
    folder.mkdir()
    widget.model_edit.setText(str(folder))
    widget._describe_model()
    info = widget.model_info
    full = f"{folder}: not a checkpoint folder (no config.json)"
    assert info.wordWrap() and info.toolTip() == full and info.plain_text() == full
    window = widget.viewer.window._qt_window
    window.resize(1400, 900)
    window.show()
    for _ in range(5):
        QApplication.processEvents()
    assert widget.width() < 600, "the label must not push the dock wider"
    assert info.width() <= widget.width()
    assert info.height() >= info.heightForWidth(info.width()), "every wrapped line must be shown whole"


def test_whole_objects_follows_the_model_and_a_warning_is_shown(widget, small_checkpoint, tmp_path):
    assert not widget.objects_check.isEnabled() and not widget.objects_check.isChecked()  # no rules in it
    ruled = tmp_path / "with-rules"
    shutil.copytree(small_checkpoint, ruled)
    config = json.loads((ruled / "config.json").read_text())
    (ruled / "config.json").write_text(json.dumps({**config, "objects": {"min_area_um2": 1500}}))
    widget.model_edit.setText(str(ruled))
    widget._describe_model()
    assert widget.objects_check.isEnabled() and widget.objects_check.isChecked()
    summary = ObjectSummary({1: "glomerulus"}, 0.5, tissue_um2=1e6, reference=ObjectRules())
    summary.add(1, [2_000_000])  # half the tissue as one object
    widget._show_warning(summary)
    assert not widget.warning.isHidden() and "50% of the tissue" in widget.warning.plain_text()
    widget._show_warning(None)
    assert widget.warning.isHidden()
