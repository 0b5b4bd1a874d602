""" "Report" dock widget: the per-biopsy numbers of the open slide, from its layers, saved as HTML or CSV.

It reads what is on screen: the slide, a Labels layer of glomerulus classes (at
any scale: a working-scale result, coarser than the slide, is placed through its
scale in µm, so it gives the numbers a full-resolution one does) and, optionally,
nuclei as a Labels layer of object ids (the Nuclei widget's) or a Points layer.
The numbers are `napari_nephro.report`'s, computed in a worker thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ...evaluation.blockwise import read_block
from ...io import SlideError
from ...report import BiopsyReport, ClassLabels, ReportError, report_from_arrays, tissue_area_um2
from ...report.page import LABELS, write_biopsy_html, write_report_csv
from ..layer_annotations import label_classes
from ._layers import UserFailure, catching, chosen, labels_layers, refill, slide_layers
from ._wrapping import WrappingLabel

if TYPE_CHECKING:
    import napari

NONE = "(none)"
ERRORS = (ReportError, SlideError, OSError)  # a user's mistake or a file gone: said in the status line
MAX_NUCLEI_PIXELS = 2**27  # nuclei centroids from a Labels layer are taken at the finest level this small


class ReportWidget(QWidget):
    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.slide_combo = QComboBox()
        self.glomeruli_combo = QComboBox()
        self.nuclei_combo = QComboBox()
        self.report_button = QPushButton("Report")
        self.html_button = QPushButton("Save HTML…")
        self.csv_button = QPushButton("Save CSV…")
        self.status = WrappingLabel("")
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(("", "value"))
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.report: BiopsyReport | None = None
        self._inputs: dict | None = None  # what the shown report was made from (for the HTML page)
        self._worker = None

        form = QFormLayout()
        form.addRow("Slide", self.slide_combo)
        form.addRow("Glomeruli", self.glomeruli_combo)
        form.addRow("Nuclei", self.nuclei_combo)
        buttons = QHBoxLayout()
        for button in (self.report_button, self.html_button, self.csv_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.table)

        self.report_button.clicked.connect(self.compute)
        self.html_button.clicked.connect(self._ask_html)
        self.csv_button.clicked.connect(self._ask_csv)
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self._refresh()
        self._saving(False)

    # -- which layers ----------------------------------------------------------------
    def _glomerulus_layers(self) -> list:
        return [layer for layer in labels_layers(self.viewer) if not layer.metadata.get("nuclei")]

    def _nuclei_layers(self) -> list:
        from napari.layers import Points

        nuclei = [layer for layer in labels_layers(self.viewer) if layer.metadata.get("nuclei")]
        return nuclei + [layer for layer in self.viewer.layers if isinstance(layer, Points)]

    def _refresh(self, *_: object) -> None:
        refill(self.slide_combo, [layer.name for layer in slide_layers(self.viewer)])
        glomeruli = self._glomerulus_layers()
        classed = [i for i, layer in enumerate(glomeruli) if layer.metadata.get("classes")]  # a model's classes
        refill(self.glomeruli_combo, [NONE] + [layer.name for layer in glomeruli], default=1 + (classed or [0])[0])
        refill(self.nuclei_combo, [NONE] + [layer.name for layer in self._nuclei_layers()], default=1)

    # -- computing ---------------------------------------------------------------------
    def chosen_layers(self) -> tuple:
        """The chosen slide, glomerulus and nuclei layers (on the GUI thread: it reads the combo boxes)."""
        slide_layer = chosen(self.slide_combo, slide_layers(self.viewer))
        if slide_layer is None:
            raise ReportError("open a slide first")
        return (
            slide_layer,
            chosen(self.glomeruli_combo, self._glomerulus_layers()),
            chosen(self.nuclei_combo, self._nuclei_layers()),
        )

    def gather(self, layers: tuple | None = None) -> dict:
        """The chosen layers as plain data: slide, placed labels, nuclei centroids (in the worker: it reads pixels)."""
        slide_layer, glomeruli, nuclei = self.chosen_layers() if layers is None else layers
        slide = slide_layer.metadata["slide"]
        if slide.mpp is None:
            raise ReportError(f"{slide.source.name}: its pixel size is unknown; set it in Slide info first")
        return {
            "slide": slide,
            "labels": None if glomeruli is None else layer_labels(glomeruli, slide_layer),
            "nuclei_xy": None if nuclei is None else nuclei_centroids(nuclei, slide_layer),
        }

    def report_now(self, inputs: dict | None = None) -> BiopsyReport:
        """The report of the chosen layers (in the calling thread)."""
        inputs = self.gather() if inputs is None else inputs
        slide, labels = inputs["slide"], inputs["labels"]
        report = report_from_arrays(
            None if labels is None else labels.array,
            1.0 if labels is None else labels.downsample,
            None if labels is None else labels.classes,
            slide_mpp=slide.mpp,
            tissue_um2=tissue_area_um2(slide, slide.mpp),
            nuclei_xy=inputs["nuclei_xy"],
            origin=(0.0, 0.0) if labels is None else labels.origin,
            slide_name=slide.source.name,
        )
        report.placed = labels
        return report

    def compute(self) -> None:
        """Report on the chosen layers in a worker (reading their pixels too); the table fills when it is done."""
        from napari.qt.threading import create_worker

        try:
            layers = self.chosen_layers()
        except ReportError as exc:
            self.status.setText(str(exc))
            return

        def job():
            inputs = self.gather(layers)
            return inputs, self.report_now(inputs)

        self.report_button.setEnabled(False)
        self.status.setText("Measuring…")
        self._worker = create_worker(  # errored given here: else napari also re-raises it in the event loop
            catching(job, ERRORS),
            _connect={"returned": self._finished, "errored": self._failed},
            _start_thread=False,
        )
        self._worker.finished.connect(lambda: self.report_button.setEnabled(True))
        self._worker.start()

    def _failed(self, exc: BaseException) -> None:
        """What no user's mistake explains (a bug, a file gone): one line, not a traceback."""
        self.status.setText(f"Failed: {type(exc).__name__}: {' '.join(str(exc).split())}")

    def _finished(self, outcome) -> None:
        if isinstance(outcome, UserFailure):
            self.status.setText(outcome)
            return
        self._inputs, self.report = outcome
        self._show(self.report)
        self._saving(True)
        self.status.setText(f"{self.report.slide}: {self.report.glomeruli or 0} glomeruli")

    def _show(self, report: BiopsyReport) -> None:
        rows = [(key, value) for key, value in report.row().items() if value is not None]
        self.table.setRowCount(len(rows))
        for r, (key, value) in enumerate(rows):
            text = f"{value:,.6g}" if isinstance(value, float) else str(value)
            self.table.setItem(r, 0, QTableWidgetItem(LABELS.get(key, key)))
            self.table.setItem(r, 1, QTableWidgetItem(text))

    def _saving(self, enabled: bool) -> None:
        self.html_button.setEnabled(enabled)
        self.csv_button.setEnabled(enabled)

    # -- saving ------------------------------------------------------------------------------
    def save_html(self, path: str | Path) -> bool:
        """The report's page (overview with outlines, numbers, areas) at `path`; False (and why) when not written."""
        if self.report is None or self._inputs is None:
            self.status.setText("Press Report first.")
            return False
        try:
            write_biopsy_html(self.report, path, slide=self._inputs["slide"], glomeruli=self._inputs["labels"])
        except ReportError as exc:
            self.status.setText(f"Not saved: {exc}")
            return False
        self.status.setText(f"Saved {Path(path).name}")
        return True

    def save_csv(self, path: str | Path) -> bool:
        if self.report is None:
            self.status.setText("Press Report first.")
            return False
        try:
            write_report_csv([self.report], path)
        except ReportError as exc:
            self.status.setText(f"Not saved: {exc}")
            return False
        self.status.setText(f"Saved {Path(path).name}")
        return True

    def _ask_html(self) -> None:
        name = f"{Path(self.report.slide).stem}.report.html" if self.report else "report.html"
        path, _ = QFileDialog.getSaveFileName(self, "Save the report page", name, "HTML (*.html)")
        if path:
            self.save_html(path)  # the dialog has asked before replacing a file

    def _ask_csv(self) -> None:
        name = f"{Path(self.report.slide).stem}.report.csv" if self.report else "report.csv"
        path, _ = QFileDialog.getSaveFileName(self, "Save the report row", name, "CSV (*.csv)")
        if path:
            self.save_csv(path)


def layer_labels(layer, slide_layer) -> ClassLabels:
    """A Labels layer placed on the slide through the two layers' scales and translates (µm).

    napari puts a pixel's centre at its translate; a whole-slide image opened by a
    reader (translate 0) sits within half its pixel of the slide's corner, and is
    taken to start there, as its file says.
    """
    levels = list(layer.data) if layer.multiscale else [layer.data]
    if levels[0].ndim != 2:
        raise ReportError(f"{layer.name}: a glomerulus layer must be 2-D, not shape {tuple(levels[0].shape)}")
    s, t0 = np.asarray(slide_layer.scale[-2:], float), np.asarray(slide_layer.translate[-2:], float)
    scale, translate = np.asarray(layer.scale[-2:], float), np.asarray(layer.translate[-2:], float)
    if str(layer.units[-1]) != str(slide_layer.units[-1]):
        raise ReportError(f"{layer.name}: is in {layer.units[-1]}, the slide in {slide_layer.units[-1]}")
    d_yx = scale / s
    if abs(d_yx[0] - d_yx[1]) > 1e-6 * d_yx[1]:
        raise ReportError(f"{layer.name}: its pixels are not square on the slide ({d_yx[1]:.4g} x {d_yx[0]:.4g})")
    d = float(d_yx[1])
    origin_yx = (translate - t0) / s - (d - 1) / 2
    origin_yx = np.where(np.abs(origin_yx) < d / 2, 0.0, origin_yx)
    classes = label_classes({"metadata": layer.metadata, "features": layer.features})
    downsamples = [levels[0].shape[-1] / level.shape[-1] for level in levels]
    return ClassLabels(levels, d, classes, (float(origin_yx[1]), float(origin_yx[0])), downsamples)


def nuclei_centroids(layer, slide_layer) -> np.ndarray:
    """Nuclei as (n, 2) level-0 x, y px: a Points layer's points, or the centroids of a Labels layer's objects."""
    from napari.layers import Points

    s, t0 = np.asarray(slide_layer.scale[-2:], float), np.asarray(slide_layer.translate[-2:], float)
    if isinstance(layer, Points):
        data = np.asarray(layer.data, float)[:, -2:]
        world = data * np.asarray(layer.scale[-2:], float) + np.asarray(layer.translate[-2:], float)
        yx = (world - t0) / s + 0.5  # napari's pixel centres to pixel corners at 0
        return yx[:, ::-1].copy()
    placed = layer_labels(layer, slide_layer)
    k = next((i for i, lv in enumerate(placed.levels) if lv.shape[-2] * lv.shape[-1] <= MAX_NUCLEI_PIXELS), None)
    if k is None:
        raise ReportError(
            f"{layer.name}: too large to take its nuclei from; report from the nuclei table (napari_nephro.report.biopsy_report)"
        )
    level = placed.levels[k]
    ids = read_block(level, 0, level.shape[-2], 0, level.shape[-1])
    ys, xs = np.nonzero(ids)  # only the nuclei's pixels, not the whole image's coordinates
    values = ids[ys, xs].astype(np.int64)
    count = np.bincount(values)
    present = np.flatnonzero(count[1:]) + 1 if count.size else np.zeros(0, np.int64)
    sy = np.bincount(values, weights=ys + 0.5, minlength=count.size)[present]
    sx = np.bincount(values, weights=xs + 0.5, minlength=count.size)[present]
    f = placed.downsample * placed.level_downsamples[k]
    x = placed.origin[0] + sx / count[present] * f
    y = placed.origin[1] + sy / count[present] * f
    return np.stack([x, y], axis=1)
