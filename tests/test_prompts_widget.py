"""The Prompts dock widget in napari: paint examples, review and save them, segment the view with SegGPT."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import require_shared, tiny_seggpt
from napari_nephro.io import open_slide
from napari_nephro.plugin.layers import slide_layer_data
from napari_nephro.plugin.widgets.prompts import PromptsWidget
from napari_nephro.prompts import PromptSet, examples_from_labels


@pytest.fixture(scope="module")
def seggpt_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights") / "seggpt"
    tiny_seggpt(folder)
    return folder


@pytest.fixture
def widget(make_napari_viewer, seggpt_folder):
    viewer = make_napari_viewer()
    slide = open_slide(require_shared("wsi", "CMU-1-Small-Region.svs"))  # 2220 x 2967, 0.499 um/px
    data, kwargs, _ = slide_layer_data(slide)
    viewer.add_image(data, **kwargs)
    widget = PromptsWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model_edit.setText(str(seggpt_folder))
    widget._describe_model()
    widget.device_combo.setCurrentText("cpu")
    widget.size_spin.setValue(96)  # small crops keep the test fast; 448 is SegGPT's own
    widget.mpp_spin.setValue(2.0)
    return widget


def paint_two(widget):
    """Paint with napari's brush: a 'normal' blob near level-0 (600, 800), a 'global sclerosis' one at (1400, 1700)."""
    paint = widget.new_prompt_layer()
    assert paint is not None, widget.prompt_status.text()
    slide_layer = widget.viewer.layers[0]
    paint.brush_size = 15
    for (x, y), label in (((600, 800), 1), ((1400, 1700), 3)):
        world = slide_layer.data_to_world((y, x))
        paint.paint(np.round(paint.world_to_data(world)).astype(int), label)
    return paint


def test_painted_objects_become_examples_in_the_gallery(widget):
    slide_layer = widget.viewer.layers[0]
    paint = paint_two(widget)
    assert paint.scale[0] == pytest.approx(slide_layer.scale[0] * 2.0 / 0.499, rel=1e-3)  # painted at 2 um/px
    assert "1 = normal" in widget.legend.text() and "3 = global sclerosis" in widget.legend.text()
    widget.add_painted()
    assert [e.label for e in widget.prompts.examples] == ["normal", "global sclerosis"], widget.prompt_status.text()
    assert widget.gallery.count() == 2
    x, y, w, h = widget.prompts.examples[0].location
    assert (x + w / 2, y + h / 2) == pytest.approx((600, 800), abs=6)  # the crop is centred on the painted blob
    assert w == pytest.approx(96 * 2.0 / 0.499)
    assert widget.prompts.examples[0].mask[48, 48] == 1
    widget.add_painted()
    assert len(widget.prompts) == 2, "adding the same painting twice adds nothing"
    widget.go_to(widget.gallery.item(1))  # double-click: the view goes to the example
    centre = slide_layer.world_to_data(widget.viewer.scene.camera.center)
    assert (centre[-1], centre[-2]) == pytest.approx((1400, 1700), abs=6)
    widget.mpp_spin.setValue(1.0)
    widget.add_painted()
    assert "remove them to change the crops" in widget.prompt_status.text() and widget.prompts.mpp == 2.0


def test_any_labels_layer_that_names_its_classes_can_be_the_painting(widget):
    """A segmentation result or a label file says which value is which class: its objects keep their class."""
    slide_layer = widget.viewer.layers[0]
    data = np.zeros((2967 // 4, 2220 // 4), np.uint8)
    data[150:170, 200:225] = 1  # level-0 around (850, 640)
    scale = tuple(np.asarray(slide_layer.scale) * 4)
    translate = tuple(np.asarray(slide_layer.translate) + np.asarray(slide_layer.scale) * 1.5)
    kwargs = {"scale": scale, "translate": translate}
    widget.viewer.add_labels(data, name="result", metadata={"classes": {1: "global sclerosis"}}, **kwargs)
    widget.paint_combo.setCurrentText("result")
    widget.add_painted()
    assert [e.label for e in widget.prompts.examples] == ["global sclerosis"], widget.prompt_status.text()
    x, y, w, h = widget.prompts.examples[0].location
    assert (x + w / 2, y + h / 2) == pytest.approx((850, 640), abs=1)
    widget.viewer.add_labels(data, name="other", metadata={"classes": {1: "glomerulus"}}, **kwargs)
    widget.paint_combo.setCurrentText("other")
    widget.add_painted()
    assert "glomerulus are not among the prompt set's classes" in widget.prompt_status.text()


def test_review_save_and_load_a_prompt_set(widget, make_napari_viewer, tmp_path):
    paint_two(widget)
    widget.add_painted()
    widget.gallery.item(0).setSelected(True)
    widget.relabel_combo.setCurrentText("segmental sclerosis")
    widget.relabel_selected()
    assert widget.prompts.examples[0].label == "segmental sclerosis"
    widget.folder_edit.setText(str(tmp_path / "set"))
    widget.save()
    assert PromptSet.load(tmp_path / "set").counts() == {"normal": 0, "segmental sclerosis": 1, "global sclerosis": 1}
    widget.gallery.clearSelection()
    widget.gallery.item(1).setSelected(True)
    widget.remove_selected()
    assert [e.label for e in widget.prompts.examples] == ["segmental sclerosis"]
    other = PromptsWidget(make_napari_viewer())
    other.folder_edit.setText(str(tmp_path / "set"))
    other.load()
    assert len(other.prompts) == 2 and other.gallery.count() == 2 and other.mpp_spin.value() == 2.0
    assert not other.mpp_spin.isEnabled(), "a set's scale is fixed once it has examples"


def test_segment_the_field_of_view_with_seggpt(widget, qtbot, monkeypatch):
    from napari_nephro.models import seggpt

    loads = []
    load = seggpt.load_seggpt
    monkeypatch.setattr(seggpt, "load_seggpt", lambda source: loads.append(source) or load(source))
    viewer = widget.viewer
    paint = paint_two(widget)
    widget.add_painted()
    camera = viewer.scene.camera
    camera.center = (1200 * 0.499, 1000 * 0.499)
    camera.zoom = 1.5 / 0.499

    def run():
        widget.result_layer = None
        widget.run()
        qtbot.waitUntil(lambda: widget.run_button.isEnabled() and widget._worker is not None, timeout=120_000)
        qtbot.waitUntil(lambda: widget.result_layer is not None or "Done" in widget.status.text(), timeout=120_000)

    run()
    paint.paint(np.round(paint.world_to_data(viewer.layers[0].data_to_world((1500, 400)))).astype(int), 2)
    widget.add_painted()
    assert len(widget.prompts) == 3
    run()
    assert len(loads) == 1, "new examples must not reload the weights"
    assert "x 3 prompts" in widget.cost.text()
    layer = widget.result_layer
    assert layer is not None, widget.status.text()
    assert list(layer.features["class"]) == ["normal", "segmental sclerosis", "global sclerosis"]
    assert set(np.unique(layer.data)) <= {0, 1, 2, 3}
    _, _, w, h = widget.region(viewer.layers[0])
    assert layer.data.shape == pytest.approx((h, w), abs=1.5)  # the view, in whole level-0 pixels


def test_a_long_run_is_announced_before_it_starts(widget, qtbot, tmp_path):
    paint_two(widget)
    widget.add_painted()
    widget.where_combo.setCurrentText("whole slide")
    widget.out_edit.setText(str(tmp_path / "whole.zarr"))
    widget.run()  # ViT-L figures: about 2 prompts x 15 s per tile on a CPU, over the whole slide
    assert "Press Run again" in widget.cost.text() and "visible field of view" in widget.cost.text()
    assert widget._worker is None, "nothing starts before the user agrees"
    widget.run()
    qtbot.waitUntil(lambda: widget._worker is not None and widget.run_button.isEnabled(), timeout=120_000)
    assert (tmp_path / "whole.zarr").exists(), widget.status.text()


def test_the_set_stays_loadable_and_savable(widget, tmp_path):
    """Edits that would break the saved set are refused; a set of any scale can be extended after loading."""
    paint_two(widget)
    widget.add_painted()
    widget.classes_edit.setText("normal, segmental sclerosis")  # the second example shows global sclerosis
    widget._classes_changed()
    assert "remove them before the class" in widget.prompt_status.text()
    assert widget.prompts.classes[-1] == "global sclerosis"
    slide = widget.viewer.layers[0].metadata["slide"]
    odd = PromptSet(["normal"], mpp=1.23456, size=96)  # more decimals than the box shows
    labels = np.zeros((742, 555), np.uint8)
    labels[100:120, 100:120] = 1
    odd.add(examples_from_labels(slide, labels, odd, downsample=4)[0][0])
    odd.save(tmp_path / "odd")
    widget.folder_edit.setText(str(tmp_path / "odd"))
    widget.load()
    paint = widget.new_prompt_layer()
    paint.data[300:320, 300:320] = 1
    widget.add_painted()
    assert len(widget.prompts) == 2 and widget.prompts.mpp == 1.23456, widget.prompt_status.text()
    widget.save()
    assert len(PromptSet.load(tmp_path / "odd")) == 2, "saving to the folder it came from needs no question"
    PromptSet(["x"]).save(tmp_path / "other")
    widget.folder_edit.setText(str(tmp_path / "other"))
    widget.save()
    assert "press Save again" in widget.prompt_status.text() and len(PromptSet.load(tmp_path / "other")) == 0
    widget.save()
    assert len(PromptSet.load(tmp_path / "other")) == 2


def test_mistakes_are_shown_not_raised(widget, tmp_path):
    assert "weights from seggpt" in widget.model_info.text()
    widget.model_edit.setText(str(tmp_path / "nowhere"))
    widget._describe_model()
    assert "no SegGPT folder" in widget.model_info.text()
    widget.model_edit.setText("BAAI/seggpt-vit-large")
    widget._describe_model()
    assert "Hugging Face cache" in widget.model_info.text()
    widget.run()
    assert "prompt set is empty" in widget.status.text()
    paint = widget.new_prompt_layer()
    widget.add_painted()
    assert "nothing is painted" in widget.prompt_status.text()
    paint.data[10:20, 10:20] = 7
    widget.add_painted()
    assert "label value(s) 7 have no class" in widget.prompt_status.text()
    widget.classes_edit.setText("normal, normal")
    widget._classes_changed()
    assert "distinct" in widget.prompt_status.text()
    assert widget.classes() == ["normal", "segmental sclerosis", "global sclerosis"]
