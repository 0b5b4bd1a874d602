"""The plugin inside a real napari viewer (under Xvfb): reader, sample data, Slide info widget."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import require_shared
from napari_nephro.io import Slide
from napari_nephro.plugin.widgets.slide_info import SlideInfoWidget
from napari_nephro.sample import SAMPLE_LEVELS, SAMPLE_MPP, SAMPLE_SHAPE


def test_reader_opens_a_slide_as_a_multiscale_layer_in_micrometres(make_napari_viewer):
    viewer = make_napari_viewer()
    path = require_shared("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    (layer,) = viewer.open(str(path), plugin="napari-nephro")
    assert layer.name == "tcga-cr-7395-01a-01-ts1.svs"
    assert layer.multiscale and layer.rgb
    assert [d.shape for d in layer.data] == [(3567, 4443, 3), (1783, 2221, 3)]
    assert isinstance(layer.metadata["slide"], Slide)
    assert tuple(str(u) for u in layer.units) == ("pixel", "pixel")  # this file has no pixel size


def test_reader_sets_scale_and_units_from_the_slide(make_napari_viewer):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(require_shared("wsi", "CMU-1-Small-Region.svs")), plugin="napari-nephro")
    assert layer.name == "CMU-1-Small-Region.svs" and layer.multiscale
    np.testing.assert_allclose(layer.scale, (0.499, 0.499))
    assert tuple(str(u) for u in layer.units) == ("micrometer", "micrometer")
    # world extent in micrometres: 2967 px x 0.499 um
    np.testing.assert_allclose(layer.extent.world[1], (2967 * 0.499 - 0.499, 2220 * 0.499 - 0.499), rtol=1e-3)


def test_dicom_folder_opens_named_after_the_folder(make_napari_viewer):
    viewer = make_napari_viewer()
    folder = require_shared("wsi", "CMU-1-Small-Region-dicom")
    (layer,) = viewer.open(str(folder), plugin="napari-nephro")
    assert layer.name == folder.name and layer.data[0].shape == (2967, 2220, 3)


def test_a_file_that_is_not_a_slide_is_one_notification_not_a_crash(make_napari_viewer, tmp_path, notifications):
    shown = notifications
    viewer = make_napari_viewer()
    bad = tmp_path / "renamed.svs"
    bad.write_text("not a slide")
    assert viewer.open(str(bad), plugin="napari-nephro") == []
    assert len(viewer.layers) == 0
    assert len(shown) == 1 and "renamed.svs" in shown[0] and "\n" not in shown[0]


def test_reader_refuses_what_it_cannot_read():
    from napari_nephro.plugin.reader import get_reader

    assert get_reader("annotations.geojson") is None
    assert get_reader("image.nd2") is None
    assert get_reader("slide.svs") is not None


def test_sample_data_is_a_real_pyramidal_slide_with_its_glomeruli(make_napari_viewer):
    viewer = make_napari_viewer()
    layer, outlines = viewer.open_sample("napari-nephro", "kidney_pas_sample")
    assert layer.multiscale and len(layer.data) == SAMPLE_LEVELS
    assert layer.data[0].shape == (*SAMPLE_SHAPE, 3)
    np.testing.assert_allclose(layer.scale, (SAMPLE_MPP, SAMPLE_MPP))
    slide = layer.metadata["slide"]
    assert slide.backend == "tifffile" and slide.vendor == "ome" and slide.associated_images == []
    tile = np.asarray(layer.data[-1][:64, :64])
    assert tile.dtype == np.uint8 and tile.std() > 0  # real pixels, decoded from the file
    # the annotated glomeruli lie on the tissue: same scale, and inside the slide
    assert outlines.nshapes == 6 and list(outlines.features["class"]) == ["glomerulus"] * 6
    np.testing.assert_allclose(outlines.scale, layer.scale)
    corners = np.concatenate(outlines.data)
    assert corners.min() >= 0 and corners.max() <= max(SAMPLE_SHAPE)


@pytest.fixture
def info_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    widget, _ = _dock(viewer)
    return viewer, widget


def _dock(viewer):
    dock, widget = viewer.window.add_plugin_dock_widget("napari-nephro", "Slide info")
    assert isinstance(widget, SlideInfoWidget)
    return widget, dock


def test_slide_info_shows_levels_and_associated_images(info_widget):
    viewer, widget = info_widget
    viewer.open(str(require_shared("wsi", "CMU-1-Small-Region.svs")), plugin="napari-nephro")
    assert widget.layer_combo.currentText() == "CMU-1-Small-Region.svs"
    assert widget.levels_table.rowCount() == 1
    assert widget.levels_table.item(0, 1).text() == "2220" and widget.levels_table.item(0, 5).text() == "0.4990"
    assert "0.4990 um/px" in widget.fields["pixel size"].text() and widget.fields["objective"].text() == "20x"
    names = [widget.associated_list.item(i).text() for i in range(widget.associated_list.count())]
    assert names == ["label", "macro", "thumbnail"]
    widget.associated_list.setCurrentRow(1)
    widget.open_associated_button.click()
    assert viewer.layers[-1].name == "CMU-1-Small-Region.svs [macro]" and viewer.layers[-1].rgb


def test_slide_info_sets_an_unknown_pixel_size_on_the_layer(info_widget):
    viewer, widget = info_widget
    (layer,) = viewer.open(str(require_shared("wsi", "tcga-cr-7395-01a-01-ts1.svs")), plugin="napari-nephro")
    assert "unknown" in widget.fields["pixel size"].text()
    widget.mpp_spin.setValue(0.252)
    widget.set_mpp_button.click()
    np.testing.assert_allclose(layer.scale, (0.252, 0.252))
    assert tuple(str(u) for u in layer.units) == ("micrometer", "micrometer")
    assert layer.metadata["slide"].mpp == pytest.approx(0.252)
    assert widget.levels_table.item(1, 5).text() == f"{0.252 * (4443 / 2221 + 3567 / 1783) / 2:.4f}"
    assert "0.2520 um/px (from the user)" in widget.fields["pixel size"].text()


def test_slide_info_follows_layers_as_they_come_and_go(info_widget):
    viewer, widget = info_widget
    assert widget.layer_combo.count() == 0
    viewer.open_sample("napari-nephro", "kidney_pas_sample")
    viewer.add_image(np.zeros((10, 10)), name="not a slide")
    assert widget.layer_combo.count() == 1 and widget.levels_table.rowCount() == SAMPLE_LEVELS
    viewer.layers.clear()
    assert widget.layer_combo.count() == 0 and widget.levels_table.rowCount() == 0
