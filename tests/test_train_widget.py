"""The Train dock widget in napari: from a slide and a Labels layer, from files, Stop and resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import require_shared
from napari_nephro.io import open_slide
from napari_nephro.plugin.layers import slide_layer_data
from napari_nephro.plugin.widgets.train import TrainWidget


@pytest.fixture
def widget(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.encoder_edit.setText("mobilenet_v2")
    widget.mpp_spin.setValue(1.0)
    widget.tile_spin.setValue(256)
    widget.overlap_spin.setValue(0)
    widget.input_spin.setValue(64)
    widget.batch_spin.setValue(4)
    widget.device_combo.setCurrentText("cpu")
    return widget


def add_aidpath_layers(viewer) -> str:
    """The first AIDPATH tile as a slide layer and its glomerulus mask as a Labels layer over it."""
    source = require_shared("glomeruli", "aidpath_pas")
    name = sorted(os.listdir(source / "images"))[0]
    data, kwargs, _ = slide_layer_data(open_slide(source / "images" / name, mpp=0.5))
    viewer.add_image(data, **kwargs)
    mask = np.asarray(Image.open(source / "masks" / name))[..., 0] > 0
    viewer.add_labels(mask.astype(np.uint8), name="glomeruli", scale=kwargs["scale"])
    return name


def wait(widget, qtbot, timeout=240_000):
    qtbot.waitUntil(lambda: widget.start_button.isEnabled(), timeout=timeout)


def test_training_from_a_slide_and_its_labels_layer(widget, qtbot, tmp_path):
    name = add_aidpath_layers(widget.viewer)
    assert widget.slide_combo.currentText() == name and widget.labels_combo.currentText() == "glomeruli"
    widget.epochs_spin.setValue(2)
    widget.out_edit.setText(str(tmp_path / "from-layers"))
    widget.start()
    wait(widget, qtbot)
    assert widget.result is not None and widget.result.path is not None, widget.status.text()
    assert len(widget.plot.loss) == 2  # the plot got both epochs
    made = json.loads((tmp_path / "from-layers" / "config.json").read_text())["provenance"]
    # one slide is split by vertical bands, never tile by tile
    assert any("band" in s for s in made["tiles"]["sources"])


def test_stop_then_start_resumes_from_files(widget, qtbot, tmp_path):
    source = require_shared("glomeruli", "aidpath_pas")
    widget.source_combo.setCurrentText("files")
    widget.annotations_edit.setText(str(source / "masks"))
    widget.images_edit.setText(str(source / "images"))
    widget.image_mpp_spin.setValue(0.5)
    widget.epochs_spin.setValue(3)
    out = tmp_path / "from-files"
    widget.out_edit.setText(str(out))
    widget.epoch_done.connect(lambda e: widget.stop() if e.epoch == 1 else None)
    widget.start()
    assert not widget.start_button.isEnabled() and widget.stop_button.isEnabled()
    wait(widget, qtbot)
    assert "Stopped after epoch 1" in widget.status.text(), widget.status.text()
    assert (tmp_path / "from-files.training").exists() and not out.exists()
    widget.epoch_done.disconnect()
    widget.epoch_done.connect(widget._show_epoch)
    widget.start()
    wait(widget, qtbot)
    assert widget.result.path == out and [e.epoch for e in widget.result.history] == [1, 2, 3], widget.status.text()


def test_mistakes_are_shown_not_raised(widget):
    widget.start()
    assert "output checkpoint folder" in widget.status.text()
    widget.out_edit.setText("/tmp/somewhere")
    widget.start()
    assert "choose a slide layer" in widget.status.text() and widget.start_button.isEnabled()


def test_a_mistake_found_in_the_worker_is_a_message(widget, qtbot, tmp_path):
    """Objects without the classes asked for are only found once the layer is read: a line, not a traceback."""
    add_aidpath_layers(widget.viewer)
    widget.classes_edit.setText("normal, global sclerosis")
    widget.out_edit.setText(str(tmp_path / "never"))
    widget.start()
    wait(widget, qtbot)
    assert "not among the model's classes" in widget.status.text() and widget.result is None
    assert not (tmp_path / "never").exists()
