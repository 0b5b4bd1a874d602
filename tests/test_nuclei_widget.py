"""The Nuclei dock widget in napari: a rectangle and the whole slide, labels with their table, count and density.

The model is the classical oracle segmenter handed to the widget through the
family loader, so these tests check the widget's own work (placing, features,
summary, cost question, cancel / resume, Compare on the result); each family's
adapter is tested with its real network in its own file.
"""

from __future__ import annotations

import numpy as np
import pytest

import napari_nephro.models.nuclei as nuclei_models
from conftest import require_shared
from napari_nephro.inference import partial_path
from napari_nephro.inference.instance_api import read_nuclei_table
from napari_nephro.inference.plan import cells
from napari_nephro.io import open_slide
from napari_nephro.plugin.layers import slide_layer_data
from napari_nephro.plugin.widgets.nuclei import NucleiWidget
from nuclei_oracle import ClassicalNuclei


class Slow(ClassicalNuclei):
    """The oracle with a CPU cost to report, as the real GPU models have."""

    cpu_seconds_per_megapixel = 5000.0
    gpu_model = True


@pytest.fixture
def widget(make_napari_viewer, monkeypatch):
    loaded = []

    def load(spec, *, device="auto", **options):
        loaded.append((spec, device, options))
        return Slow() if spec.endswith(":slow") else ClassicalNuclei()

    monkeypatch.setattr(nuclei_models, "load_nuclei_model", load)
    viewer = make_napari_viewer()
    slide = open_slide(require_shared("wsi", "CMU-1-Small-Region.svs"))
    data, kwargs, _ = slide_layer_data(slide)
    viewer.add_image(data, **kwargs)
    widget = NucleiWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.loaded = loaded
    return widget


def run_and_wait(widget, qtbot, timeout=120_000):
    widget.run()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled() and "Loading" not in widget.status.text(), timeout=timeout)


@pytest.mark.shared
def test_a_rectangle_of_nuclei_becomes_aligned_labels_with_their_table(widget, qtbot):
    viewer = widget.viewer
    mpp = viewer.layers[0].scale[-1]
    x0, y0, x1, y1 = 400, 300, 1400, 1100
    viewer.add_shapes([np.array([[y0, x0], [y1, x1]]) * mpp], shape_type="rectangle", name="roi")
    widget.where_combo.setCurrentText("Shapes rectangle")
    widget.family_combo.setCurrentText("cellpose")
    widget.diameter_spin.setValue(8)
    run_and_wait(widget, qtbot)
    layer = widget.result_layer
    assert layer is not None, widget.status.text()
    assert widget.loaded[-1][0] == "cellpose" and widget.loaded[-1][2]["diameter"] == 8
    # the rectangle's corners come back through world coordinates: within a pixel of where it was drawn
    assert np.allclose(layer.data.shape, (y1 - y0, x1 - x0), atol=2) and layer.data.dtype == np.uint32
    slide_layer = viewer.layers[0]
    np.testing.assert_allclose(slide_layer.world_to_data(layer.data_to_world((0, 0))), (y0, x0), atol=1)
    ids = np.unique(layer.data)
    ids = ids[ids != 0]
    features = layer.features
    assert sorted(features["index"]) == ids.tolist()  # one row per nucleus on the layer
    assert set(features["class"]) <= {"small", "large"}
    count = len(ids)
    assert f"{count:,} nuclei" in widget.status.text() and "per mm² of tissue" in widget.status.text()


@pytest.mark.shared
def test_the_options_shown_follow_the_family(widget):
    widget.family_combo.setCurrentText("stardist")
    assert widget.form.isRowVisible(widget.prob_spin) and not widget.form.isRowVisible(widget.diameter_spin)
    assert widget.options() == {"prob_threshold": None, "nms_threshold": None}
    widget.prob_spin.setValue(0.6)
    assert widget.options()["prob_threshold"] == pytest.approx(0.6)
    widget.family_combo.setCurrentText("cellvit")
    assert widget.options() == {} and "GPU" in widget.model_info.text()
    assert widget.spec() == "cellvit"
    widget.model_edit.setText("/models/CellViT-256-x40.pth")
    assert widget.spec() == "cellvit:/models/CellViT-256-x40.pth"


@pytest.mark.shared
def test_a_gpu_model_on_a_cpu_says_what_it_costs_before_it_runs(widget, qtbot):
    widget.family_combo.setCurrentText("cellpose")
    widget.model_edit.setText("slow")
    widget.where_combo.setCurrentText("whole slide")
    widget.device_combo.setCurrentText("cpu")
    widget.run()  # the model loads off the GUI thread, then the cost is shown and nothing starts
    qtbot.waitUntil(lambda: "Press Run again" in widget.status.text(), timeout=60_000)
    assert widget.run_button.isEnabled() and widget.result_layer is None
    text = widget.status.text()
    assert "on this CPU" in text and "GPU model" in text and "Press Run again" in text


@pytest.mark.shared
def test_the_whole_slide_is_cancelled_resumed_and_shown_as_a_multiscale_layer(widget, qtbot, tmp_path):
    out = tmp_path / "cmu.nuclei.zarr"
    widget.out_edit.setText(str(out))
    widget.where_combo.setCurrentText("whole slide")
    widget.family_combo.setCurrentText("stardist")
    widget.batch_spin.setValue(2)
    widget.progressed.connect(lambda p: widget.cancel() if p.done > 40 else None)
    run_and_wait(widget, qtbot)
    assert "Cancelled" in widget.status.text() and partial_path(out).exists()
    widget.progressed.disconnect()
    widget.progressed.connect(widget._show_progress)
    run_and_wait(widget, qtbot)  # Run again resumes the unfinished run
    assert out.exists(), widget.status.text()
    layer = widget.result_layer
    slide_layer = widget.viewer.layers[0]
    scale = 0.5 / slide_layer.scale[-1]  # the model's grid (0.5 um/px) by default
    height, width = slide_layer.data[0].shape[:2]
    assert layer.multiscale and layer.data[0].shape == (cells(height, scale), cells(width, scale))
    np.testing.assert_allclose(layer.extent.world, slide_layer.extent.world, atol=layer.scale[-1])
    table = read_nuclei_table(out)
    assert len(layer.features) == len(table) and f"{len(table):,} nuclei" in widget.status.text()


@pytest.mark.shared
def test_compare_scores_a_nuclei_layer_against_another(widget, qtbot):
    from napari_nephro.plugin.widgets.compare import CompareWidget

    viewer = widget.viewer
    viewer.add_shapes([np.array([[200, 200], [900, 1000]]) * viewer.layers[0].scale[-1]], shape_type="rectangle")
    widget.where_combo.setCurrentText("Shapes rectangle")
    run_and_wait(widget, qtbot)
    first = widget.result_layer
    truth = viewer.add_labels(first.data.copy(), scale=first.scale, translate=first.translate, name="truth")
    compare = CompareWidget(viewer)
    compare.pred_combo.setCurrentText(first.name)
    compare.truth_combo.setCurrentText(truth.name)
    compare.compare()
    n = len(np.unique(first.data)) - 1
    assert f"{n} true, {n} predicted" in compare.summary.text()
