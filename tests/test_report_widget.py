"""The Report dock widget: the numbers of the open slide's layers are biopsy_report's, at any scale of the labels."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from napari.layers import Layer

import test_report
from napari_nephro.annotations.labeltiff import read_label_tiff_pyramid
from napari_nephro.annotations.omezarr import read_label_zarr
from napari_nephro.io import open_slide
from napari_nephro.plugin.annotation_reader import labels_layer_data
from napari_nephro.plugin.layers import slide_layer_data
from napari_nephro.plugin.widgets.report import ReportWidget
from napari_nephro.report import biopsy_report

known = test_report.known  # the sample slide with six glomeruli of known classes, outputs at three scales, nuclei


@pytest.fixture
def widget(make_napari_viewer, known):
    """A viewer as a user has it: the slide, a working-scale output and a full-resolution one opened by the
    plugin's reader, and the nuclei as points over the slide."""
    viewer = make_napari_viewer()
    data, kwargs, _ = slide_layer_data(open_slide(known["slide"]))
    slide_layer = viewer.add_image(data, **kwargs)
    outputs = known["outputs"]
    for pyramid, name in (
        (read_label_tiff_pyramid(outputs["full"]), "full.tif"),
        (read_label_zarr(outputs["coarse4.zarr"]), "coarse4.zarr"),
    ):
        viewer.add_layer(Layer.create(*labels_layer_data(pyramid, name)))
    yx = known["xy"][:, ::-1] - 0.5  # napari places a point on a pixel's centre
    viewer.add_points(yx, scale=slide_layer.scale, name="nuclei")
    widget = ReportWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return widget


def report_and_wait(widget, qtbot):
    widget.report = None
    widget.compute()
    qtbot.waitUntil(lambda: widget.report is not None and widget.report_button.isEnabled(), timeout=60_000)
    return widget.report


def test_the_widget_reports_what_biopsy_report_does_from_layers_at_any_scale(widget, known, qtbot):
    assert widget.nuclei_combo.currentText() == "nuclei"
    rows = {}
    for name in ("coarse4.zarr", "full.tif"):
        widget.glomeruli_combo.setCurrentText(name)
        shown = report_and_wait(widget, qtbot).row()
        expected = biopsy_report(
            known["slide"], known["outputs"]["full" if name == "full.tif" else name], known["nuclei"]
        )
        assert {k: v for k, v in shown.items() if k != "models"} == {
            k: v
            for k, v in expected.row().items()
            if k != "models"  # layers carry no run record
        }
        assert shown["glomeruli"] == 6 and shown["globally_sclerosed"] == 2
        assert shown["nuclei_in_glomeruli"] == int(known["inside"].sum())
        texts = [widget.table.item(r, 1).text() for r in range(widget.table.rowCount())]
        assert "normal: 3; segmental sclerosis: 1; global sclerosis: 2" in texts and "33.33" in texts
        rows[name] = shown
    same = ("glomeruli", "glomeruli_by_class", "globally_sclerosed", "nuclei_in_glomeruli", "nuclei_outside_glomeruli")
    assert {k: rows["coarse4.zarr"][k] for k in same} == {k: rows["full.tif"][k] for k in same}
    widget.glomeruli_combo.setCurrentText("(none)")
    widget.nuclei_combo.setCurrentText("(none)")
    assert (
        report_and_wait(widget, qtbot).glomeruli is None and widget.report.tissue_mm2 == rows["full.tif"]["tissue_mm2"]
    )


def test_the_report_is_saved_as_a_page_and_a_row(widget, qtbot, tmp_path):
    assert not widget.html_button.isEnabled()  # nothing to save before a report
    report = report_and_wait(widget, qtbot)
    assert widget.html_button.isEnabled() and widget.csv_button.isEnabled()
    assert widget.save_html(tmp_path / "page.html") and widget.save_csv(tmp_path / "row.csv")
    page = (tmp_path / "page.html").read_text()
    assert report.slide in page and "data:image/png;base64," in page
    with open(tmp_path / "row.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["glomeruli"] == str(report.glomeruli) and float(row["tissue_mm2"]) == report.tissue_mm2
    assert not widget.save_csv(tmp_path / "missing" / "row.csv")
    assert widget.status.plain_text().startswith("Not saved:") and "does not exist" in widget.status.plain_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html", "row.csv"]
    assert np.isfinite(report.nuclei_per_mm2)
    assert report.nuclei == 600 and report.nuclei_per_mm2 == pytest.approx(600 / report.tissue_mm2, rel=1e-3)
    slide = open_slide(test_report.sample_slide_path())
    assert report.tissue_mm2 == pytest.approx(test_report._glass_free_area_mm2(slide), rel=0.06)  # independent


def test_a_failure_while_reading_the_layers_is_one_line_in_the_widget(widget, qtbot, monkeypatch):
    """A user's mistake (a 3-D glomerulus layer) and a failure nobody foresaw both end as a line, not a traceback."""
    from napari_nephro.plugin.widgets import report as report_widget

    widget.viewer.add_labels(np.zeros((2, 8, 8), np.uint8), name="stack")
    widget.glomeruli_combo.setCurrentText("stack")
    widget.compute()
    qtbot.waitUntil(lambda: widget.report_button.isEnabled() and "must be 2-D" in widget.status.plain_text())
    assert widget.report is None and "\n" not in widget.status.plain_text()

    def broken(*_):
        raise RuntimeError("the layer's store went away\nwhile reading")

    monkeypatch.setattr(report_widget, "nuclei_centroids", broken)
    widget.glomeruli_combo.setCurrentText("coarse4.zarr")
    widget.compute()
    qtbot.waitUntil(lambda: widget.report_button.isEnabled() and widget.status.plain_text().startswith("Failed"))
    assert widget.status.plain_text() == "Failed: RuntimeError: the layer's store went away while reading"
    assert widget.report is None and not widget.html_button.isEnabled()


def test_nuclei_from_a_labels_layer_of_ids_count_inside_and_outside(widget, known, qtbot):
    """The Nuclei widget's layer (object ids, metadata "nuclei"): each object one nucleus at its centroid."""
    xy, inside = known["xy"][:200], known["inside"][:200]  # at least 10 µm from any glomerulus outline
    ids = np.zeros(widget.viewer.layers[0].data[0].shape[:2], np.uint32)
    yy, xx = np.mgrid[-3:4, -3:4]
    disc = yy**2 + xx**2 <= 9
    for k, (x, y) in enumerate(xy.astype(int), start=1):
        ids[y + yy[disc], x + xx[disc]] = k
    slide_layer = widget.viewer.layers[0]
    widget.viewer.add_labels(
        ids, scale=slide_layer.scale, units=slide_layer.units, name="ids", metadata={"nuclei": True}
    )
    widget.nuclei_combo.setCurrentText("ids")
    widget.glomeruli_combo.setCurrentText("coarse4.zarr")
    report = report_and_wait(widget, qtbot)
    assert report.nuclei == 200
    assert (report.nuclei_in_glomeruli, report.nuclei_outside_glomeruli) == (int(inside.sum()), int((~inside).sum()))
