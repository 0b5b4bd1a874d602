"""The Review dock widget in napari: rate with keys, restart, a second rater blinded, disagreements settled, the
figures shown, a hard patch corrected and saved, a fine-tuned model added for a second round.

The project is real: three 128 px patches of CMU-1 with the shipped nuclei model's predictions under two names
(made once, copied per test). Keys are pressed through napari's own key handler, the path a key press on the
canvas takes, so a layer's mode keys (1 = erase on a Labels layer) would win if the widget's bindings did not.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import require_shared
from napari_nephro.pipelines.review import new_project
from napari_nephro.plugin.widgets.review import ReviewWidget
from napari_nephro.review import layout, stats
from napari_nephro.review.consensus import effective_ratings

MODELS = ["nuclei", "again"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    slide = require_shared("wsi", "CMU-1-Small-Region.svs")
    root = tmp_path_factory.mktemp("review") / "project"
    return new_project(root, [slide], ["nuclei", "again=nuclei"], patches=3, size=128, mpp=0.5, seed=3, device="cpu")


@pytest.fixture
def project(made, tmp_path):
    return shutil.copytree(made, tmp_path / "project")


@pytest.fixture
def open_widget(make_napari_viewer):
    def make(root, rater):
        viewer = make_napari_viewer()
        widget = ReviewWidget(viewer)
        viewer.window.add_dock_widget(widget)
        assert widget.open_project(root, rater), widget.status.plain_text()
        return widget

    return make


def press(widget, key: str) -> None:
    """A key press as the canvas delivers it: through the viewer's key handler (active layer's keys first)."""
    assert widget.viewer.window._qt_viewer._key_map_handler.press_key(key), key


def ratings_file(root, rater) -> list[tuple[str, str, str]]:
    lines = layout.ratings_csv(root, rater).read_text().splitlines()[1:]
    return [tuple(line.split(",")[:3]) for line in lines]


def test_keys_rate_the_model_in_focus_save_at_once_and_move_on(project, open_widget, monkeypatch):
    widget = open_widget(project, "ann")
    viewer = widget.viewer
    for key in ("1", "2", "3", "Left", "Right", "Up", "Down", "A"):
        assert key in {str(k) for k in viewer.keymap}, key
    image, first, second = viewer.layers["patch"], viewer.layers["nuclei"], viewer.layers["again"]
    assert image.rgb and first.contour == 1 and second.contour == 1
    np.testing.assert_array_equal(first.data, layout.read_labels(layout.prediction_tif(project, "nuclei", "p0001")))
    objects = len(np.unique(first.data)) - 1
    assert objects > 0 and f"nuclei {objects}" in widget.stats_label.plain_text()
    assert "agreement F1: nuclei–again 1.00" in widget.stats_label.plain_text()  # the same network twice
    assert widget.counter_label.text() == "0 / 3 rated" and widget.patch() == "p0001"
    assert widget.focused() == "nuclei" and first.visible and not second.visible

    press(widget, "1")  # good for nuclei: saved at once, the focus moves to the next unrated model
    assert ratings_file(project, "ann") == [("p0001", "nuclei", "good")]
    assert widget.focused() == "again" and second.visible and not first.visible
    viewer.layers.selection.active = second  # on a Labels layer, 3 would be napari's polygon mode
    press(widget, "3")
    assert ratings_file(project, "ann")[-1] == ("p0001", "again", "bad") and second.mode != "polygon"
    assert widget.counter_label.text() == "1 / 3 rated" and widget.patch() == "p0002"  # finished: next patch
    press(widget, "Left")
    assert widget.patch() == "p0001" and "nuclei: good" in widget.rated_label.plain_text()
    assert widget.focused() == "nuclei"  # p0002 started at its first unrated model; a finished patch keeps it
    press(widget, "2")  # re-rating a finished patch: the last line wins, the patch stays
    assert layout.read_ratings(project, "ann")[("p0001", "nuclei")] == "medium" and widget.patch() == "p0001"
    press(widget, "Right")
    press(widget, "Right")
    assert widget.patch() == "p0003"
    measured = []
    real = stats.patch_stats
    monkeypatch.setattr(stats, "patch_stats", lambda *a, **k: measured.append(a[1]) or real(*a, **k))
    press(widget, "Down")
    assert widget.focused() == "again"
    press(widget, "Down")  # wraps around
    assert widget.focused() == "nuclei"
    press(widget, "Up")
    assert widget.focused() == "again"
    press(widget, "A")
    assert first.visible and second.visible and widget.all_check.isChecked()
    assert measured == []  # a patch's counts are measured when it is shown, not on every focus change
    press(widget, "Left")
    assert measured == ["p0002"] and "agreement F1" in widget.stats_label.plain_text()


def test_a_restart_keeps_the_ratings_and_a_second_rater_sees_none_of_them(project, open_widget):
    widget = open_widget(project, "ann")
    for key in ("1", "1", "2"):  # p0001 finished, p0002 half rated
        press(widget, key)
    assert widget.counter_label.text() == "1 / 3 rated"
    again = open_widget(project, "ann")
    assert again.counter_label.text() == "1 / 3 rated" and again.patch() == "p0002"
    assert again.focused() == "again"  # p0002's unrated model
    assert "nuclei: medium" in again.rated_label.plain_text()

    before = layout.ratings_csv(project, "ann").read_bytes()
    bob = open_widget(project, "bob")
    assert bob.counter_label.text() == "0 / 3 rated" and bob.patch() == "p0001"
    assert "nuclei: —" in bob.rated_label.plain_text() and "again: —" in bob.rated_label.plain_text()
    assert bob.disagreements_list.count() == 0 and not bob.disagreements_list.isEnabled()
    press(bob, "3")
    assert ratings_file(project, "bob") == [("p0001", "nuclei", "bad")]
    assert layout.ratings_csv(project, "ann").read_bytes() == before
    bob.set_rater("")
    assert not bob.rate("good") and "rater name" in bob.status.plain_text()
    bob.set_rater("ann")  # changing the rater shows that rater's own ratings
    assert bob.counter_label.text() == "1 / 3 rated"


def test_the_adjudicator_lists_the_disagreements_and_settles_them(project, open_widget):
    layout.append_rating(project, "ann", "p0002", "again", "good")
    layout.append_rating(project, "bob", "p0002", "again", "bad")
    layout.append_rating(project, "bob", "p0001", "nuclei", "good")  # one rater only: agreed
    widget = open_widget(project, layout.ADJUDICATOR)
    assert widget.disagreements_list.count() == 1
    assert widget.disagreements_list.item(0).text() == "p0002 · again: ann good, bob bad"
    widget.disagreements_list.setCurrentRow(0)
    assert widget.patch() == "p0002" and widget.focused() == "again"
    press(widget, "2")
    assert layout.read_ratings(project, layout.ADJUDICATOR) == {("p0002", "again"): "medium"}
    assert effective_ratings(project)[("p0002", "again")] == "medium"
    assert widget.disagreements_list.count() == 0 and "No disagreement" in widget.disagreements_label.plain_text()


def test_results_write_and_show_the_figures_and_the_summary(project, open_widget):
    widget = open_widget(project, "ann")
    for _ in range(3):
        press(widget, "1")
        press(widget, "3")
    paths = widget.show_results()
    figures = [p for p in paths if p.suffix == ".png"]
    assert len(figures) == 3 and all(p.is_file() and p.parent == layout.results_dir(project) for p in figures)
    from qtpy.QtWidgets import QLabel

    pixmaps = [label.pixmap() for label in widget.results_dialog.findChildren(QLabel) if label.pixmap() is not None]
    assert len([p for p in pixmaps if not p.isNull()]) == 3 and widget.results_dialog.isVisible()
    summary = widget.results_label.text()
    assert "3 patches, 2 models" in summary and "nuclei: good 3, medium 0, bad 0" in summary
    assert "again: good 0, medium 0, bad 3" in summary and "fused: good 3" in summary


def test_a_hard_patch_is_corrected_from_its_best_prediction_and_saved(project, open_widget):
    widget = open_widget(project, "ann")
    widget.start_correction()
    assert widget.correcting is None and "No fused-bad patch" in widget.correction_label.plain_text()
    for key in ("1", "1", "3", "3"):  # p0001 good, p0002 bad for both models: the one hard patch
        press(widget, key)
    widget.start_correction()
    assert widget.correcting == ["p0002"] and widget.patch() == "p0002"
    layer = widget.viewer.layers["correction"]
    start = layout.read_labels(layout.prediction_tif(project, widget.started_from, "p0002"))
    np.testing.assert_array_equal(layer.data, start)
    assert widget.viewer.layers.selection.active is layer and layer.editable
    assert not widget.viewer.layers["nuclei"].visible and not widget.viewer.layers["again"].visible
    assert not widget.rate("good")  # no rating while correcting
    painted = layer.data.copy()
    painted[painted == painted.max()] = 0  # erase one object
    painted[2:12, 2:12] = 999  # paint a new one in a corner
    layer.data = painted
    path = widget.save_correction()
    saved = layout.read_labels(path)
    assert saved.shape == (128, 128) and saved.dtype == np.uint32
    assert len(np.unique(saved)) - 1 == len(np.unique(start)) - 1  # one erased, one painted
    corner = saved[2:12, 2:12]
    assert (corner > 0).all() and len(np.unique(corner)) == 1 and (saved == corner[0, 0]).sum() == 100
    rows = layout.read_rows(project / layout.CORRECTIONS_CSV, layout.CORRECTION_FIELDS)
    assert [(r["patch"], r["rater"], r["started_from"]) for r in rows] == [("p0002", "ann", widget.started_from)]
    # no hard patch left: back to rating, the correction layer gone
    assert widget.correcting is None and "correction" not in [la.name for la in widget.viewer.layers]
    assert widget.rate_buttons["good"].isEnabled()


def rate_for_finetune(widget):
    for key in ("1", "2", "1", "2", "3", "3"):  # two easy pairs (nuclei good), one hard patch
        press(widget, key)


def test_fine_tune_on_easy_and_hard_adds_the_new_model_for_a_second_round(project, open_widget, qtbot):
    widget = open_widget(project, "ann")
    rate_for_finetune(widget)
    widget.start_correction()
    widget.save_correction()  # the hard patch saved as it started
    widget.tune_combo.setCurrentText("nuclei")
    widget.epochs_spin.setValue(1)
    widget.steps_spin.setValue(1)
    widget.batch_spin.setValue(2)
    widget.crop_spin.setValue(64)
    widget.device_combo.setCurrentText("cpu")
    stages = []
    widget.progressed.connect(lambda stage, done, total: stages.append(stage))
    widget.start_finetune()
    assert not widget.tune_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: widget.tune_button.isEnabled(), timeout=120_000)
    entry = widget.result
    assert entry is not None and not isinstance(entry, str), widget.tune_label.plain_text()
    assert entry.name == "nuclei-ft1" and layout.read_project(project).model_names == [*MODELS, "nuclei-ft1"]
    assert {"export", "fine-tune", "predict"} <= set(stages)
    for patch in ("p0001", "p0002", "p0003"):
        assert layout.prediction_tif(project, "nuclei-ft1", patch).is_file()
    checkpoint = project / "finetune" / "nuclei-ft1" / "model"
    made = json.loads((checkpoint / "config.json").read_text())["provenance"]["review"]
    assert made["sets"] == {"easy": 2, "hard": 1}
    tiles = (project / "finetune" / "nuclei-ft1" / "set" / "tiles.csv").read_text()
    assert tiles.count("\n") == 4  # header + 3 pairs
    # the second round: the new model is shown and waits for ratings
    assert "nuclei-ft1" in [widget.focus_combo.itemText(i) for i in range(widget.focus_combo.count())]
    assert "nuclei-ft1" in [la.name for la in widget.viewer.layers]
    assert widget.counter_label.text() == "0 / 3 rated" and widget.focused() == "nuclei-ft1"
    patch = widget.patch()
    press(widget, "1")
    assert layout.read_ratings(project, "ann")[(patch, "nuclei-ft1")] == "good"
    assert widget.counter_label.text() == "1 / 3 rated"


def test_a_cancelled_fine_tune_adds_nothing(project, open_widget, qtbot):
    widget = open_widget(project, "ann")
    rate_for_finetune(widget)
    widget.epochs_spin.setValue(2)
    widget.crop_spin.setValue(64)
    widget.batch_spin.setValue(2)
    widget.device_combo.setCurrentText("cpu")
    widget.progressed.connect(lambda stage, done, total: widget.cancel_finetune() if stage == "fine-tune" else None)
    widget.start_finetune()
    qtbot.waitUntil(lambda: widget.tune_button.isEnabled(), timeout=120_000)
    assert widget.result is None and "Stopped" in widget.tune_label.plain_text()
    assert layout.read_project(project).model_names == MODELS
    assert not (project / "finetune" / "nuclei-ft1").exists()  # nor its exported set: the round never happened


def test_a_fine_tune_with_nothing_rated_says_so_and_leaves_no_round_folder(project, open_widget, qtbot):
    widget = open_widget(project, "ann")
    widget.device_combo.setCurrentText("cpu")
    widget.start_finetune()
    qtbot.waitUntil(lambda: widget.tune_button.isEnabled(), timeout=60_000)
    said = widget.tune_label.plain_text()
    assert "nothing to export" in said and "Traceback" not in said and "\n" not in said
    assert layout.read_project(project).model_names == MODELS
    assert not (project / "finetune").exists() or not any((project / "finetune").iterdir())
