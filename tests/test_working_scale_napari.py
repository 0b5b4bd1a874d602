"""napari with a whole-slide result at the model's working scale: over the slide in um, and comparable."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import require_shared
from napari_nephro.inference import segment_slide
from napari_nephro.io import open_slide
from napari_nephro.plugin.widgets.compare import CompareWidget
from test_working_scale import Blobs

SLIDE = ("wsi", "CMU-1-Small-Region.svs")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    slide = open_slide(require_shared(*SLIDE))
    folder = tmp_path_factory.mktemp("napari-scales")
    working = segment_slide(slide, Blobs(), folder / "working.zarr", objects=None)
    full = segment_slide(slide, Blobs(), folder / "full.zarr", out_downsample="full", objects=None)
    outlines = segment_slide(slide, Blobs(), folder / "working.geojson", objects=None)
    return working, full, outlines.path


@pytest.fixture
def viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open(str(require_shared(*SLIDE)), plugin="napari-nephro")
    return viewer


def test_a_working_scale_result_opens_over_the_slide_in_micrometres(viewer, outputs):
    working, _, _ = outputs
    slide_layer = viewer.layers[0]
    (layer,) = viewer.open(str(working.path), plugin="napari-nephro")
    d, mpp = working.out_downsample, slide_layer.scale[-1]
    np.testing.assert_allclose(layer.scale, (mpp * d, mpp * d))

    def corners(lyr):  # pixel edges in um: napari puts a pixel's centre at its data coordinate
        shape = np.asarray(lyr.data[0].shape[:2] if lyr.multiscale else lyr.data.shape[:2], float)
        return np.asarray(lyr.data_to_world((-0.5, -0.5))), np.asarray(lyr.data_to_world(shape - 0.5))

    (top, bottom), (slide_top, slide_bottom) = corners(layer), corners(slide_layer)
    np.testing.assert_allclose(top, slide_top, atol=1e-6)  # the same top-left corner
    assert np.all(bottom >= slide_bottom - 1e-6) and np.all(bottom - slide_bottom < layer.scale[-1])
    np.testing.assert_allclose(layer.extent.world, slide_layer.extent.world, atol=layer.scale[-1])
    # a slide pixel's centre falls in the working pixel that covers it
    for y, x in ((0, 0), (1000, 700), (2966, 2219)):
        inside = np.asarray(layer.world_to_data(slide_layer.data_to_world((y, x))))
        np.testing.assert_allclose(inside, ((y + 0.5) / d - 0.5, (x + 0.5) / d - 0.5), atol=1e-6)


def _dice(widget) -> float:
    return float(re.search(r"Dice ([0-9.]+)", widget.summary.text()).group(1))


def _compare(widget, viewer, pred: str, truth: str) -> None:
    """Compare the layers named `pred` and `truth`: a combo box ignores a name it lacks, so check it took them."""
    widget.pred_combo.setCurrentText(pred)
    widget.truth_combo.setCurrentText(truth)
    assert (widget.pred_combo.currentText(), widget.truth_combo.currentText()) == (pred, truth)
    widget.compare()
    assert widget.views is not None, widget.summary.text()
    assert widget.views.pred_layer is viewer.layers[pred] and widget.views.truth_layer is viewer.layers[truth]


def test_compare_takes_a_working_scale_layer_against_a_full_resolution_one(viewer, outputs):
    working, full, _ = outputs
    viewer.open(str(working.path), plugin="napari-nephro")
    viewer.open(str(full.path), plugin="napari-nephro")
    widget = CompareWidget(viewer)
    for pred, truth in (("working.zarr", "full.zarr"), ("full.zarr", "working.zarr")):
        _compare(widget, viewer, pred, truth)
        assert _dice(widget) > 0.99, widget.summary.text()
        result = widget.result_layer
        assert result.data.shape == (2967, 2220)
        np.testing.assert_allclose(result.scale, viewer.layers["full.zarr"].scale)  # on the finer grid


def test_compare_draws_polygons_on_the_working_grid(viewer, outputs):
    working, full, outlines = outputs
    viewer.open(str(working.path), plugin="napari-nephro")
    viewer.open(str(full.path), plugin="napari-nephro")
    (shapes,) = viewer.open(str(outlines), plugin="napari-nephro")  # the working map's outlines, level-0 pixels
    widget = CompareWidget(viewer)
    _compare(widget, viewer, "working.zarr", shapes.name)
    coarse = _dice(widget)
    _compare(widget, viewer, "full.zarr", shapes.name)
    fine = _dice(widget)
    # Shapes hold no holes, so neither is 1; the coarse layer meets them as well as the full one does
    assert fine > 0.9 and abs(coarse - fine) < 0.01, widget.summary.text()
