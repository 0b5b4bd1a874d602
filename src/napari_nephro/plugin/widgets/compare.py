""" "Compare" dock widget: a prediction Labels layer against a ground-truth one.

Adds the TP/FP/FN layer (green, yellow, red, as in the paper's figures) and a
table of objects; clicking a row centres the view on that object.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from scipy import ndimage

from ...annotations import AnnotationError
from ...annotations._write import atomic_write_bytes
from ...evaluation import match_instances, object_table, pixel_scores, tp_fp_fn_map
from ...evaluation.tpfpfn import TPFPFN_COLORS
from ._layers import chosen, labels_layers, refill

if TYPE_CHECKING:
    import napari

MAX_PIXELS = 2**26  # 64 MP: instance matching holds a few copies of the labels in memory
TABLE_COLUMNS = ("side", "id", "class", "area_px", "area_um2", "matched_id", "iou", "outcome")


class CompareWidget(QWidget):
    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.pred_combo = QComboBox()
        self.truth_combo = QComboBox()
        self.iou_spin = QDoubleSpinBox(decimals=2, minimum=0.05, maximum=1.0, singleStep=0.05)
        self.iou_spin.setValue(0.5)
        self.compare_button = QPushButton("Compare")
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(TABLE_COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.copy_button = QPushButton("Copy table as CSV")
        self.save_button = QPushButton("Save CSV…")
        self.rows: list[dict] = []
        self.result_layer = None
        self.downsample = 1

        form = QFormLayout()
        form.addRow("Prediction", self.pred_combo)
        form.addRow("Ground truth", self.truth_combo)
        form.addRow("Match at IoU ≥", self.iou_spin)
        buttons = QHBoxLayout()
        buttons.addWidget(self.compare_button)
        buttons.addWidget(self.copy_button)
        buttons.addWidget(self.save_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.summary)
        layout.addWidget(self.table)

        self.compare_button.clicked.connect(self.compare)
        self.copy_button.clicked.connect(self.copy_csv)
        self.save_button.clicked.connect(self._ask_save_csv)
        self.table.cellClicked.connect(self.jump_to_row)
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self._refresh()

    def _labels_layers(self):
        return labels_layers(self.viewer, exclude=self.result_layer)

    def _refresh(self, *_: object) -> None:
        names = [layer.name for layer in self._labels_layers()]
        refill(self.pred_combo, names, default=0)
        refill(self.truth_combo, names, default=1)

    def compare(self) -> None:
        pred_layer, truth_layer = (
            chosen(self.pred_combo, self._labels_layers()),
            chosen(self.truth_combo, self._labels_layers()),
        )
        if pred_layer is None or truth_layer is None:
            self.summary.setText("Choose a prediction and a ground-truth Labels layer.")
            return
        shapes = (_level0_shape(pred_layer), _level0_shape(truth_layer))
        if shapes[0] != shapes[1]:
            self.summary.setText(
                f"The layers differ in shape ({shapes[0]} vs {shapes[1]}): they must cover the same image."
            )
            return
        self.downsample = _downsample_for(shapes[1])
        pred, truth = _comparable(pred_layer, self.downsample), _comparable(truth_layer, self.downsample)
        pixel = pixel_scores(pred, truth)
        result = match_instances(pred, truth, self.iou_spin.value())
        mpp = float(truth_layer.scale[-1]) * self.downsample if str(truth_layer.units[-1]) == "micrometer" else None
        classes = truth_layer.metadata.get("classes")
        self.rows = object_table(result, truth_classes=classes if isinstance(classes, dict) else None, mpp=mpp)
        self._show_table()
        self._show_map(tp_fp_fn_map(pred, truth), pred_layer, truth_layer)
        note = (
            f"Computed at 1/{self.downsample} resolution: the layers are too large to compare whole in memory; "
            "`nephro evaluate` scores full resolution.  |  "
            if self.downsample > 1
            else ""
        )
        self.summary.setText(
            note
            + f"Dice {_fmt(pixel.dice)}  IoU {_fmt(pixel.iou)}  |  objects: {result.n_true} true, {result.n_pred} predicted, "
            f"TP {result.tp}, FP {result.fp}, FN {result.fn}  |  precision {_fmt(result.precision)}, "
            f"recall {_fmt(result.recall)}, F1 {_fmt(result.f1)}, PQ {_fmt(result.panoptic_quality)}"
        )

    def _show_map(self, agreement: np.ndarray, pred_layer, truth_layer) -> None:
        from napari.utils.colormaps import DirectLabelColormap

        colors = {0: "transparent", None: "transparent"}
        colors.update({k: np.array([*v, 255]) / 255 for k, v in TPFPFN_COLORS.items()})
        name = f"TP/FP/FN: {pred_layer.name} vs {truth_layer.name}"
        if self.result_layer is not None and self.result_layer in self.viewer.layers:
            self.viewer.layers.remove(self.result_layer)
        self.result_layer = self.viewer.add_labels(
            agreement,
            name=name,
            colormap=DirectLabelColormap(color_dict=colors),
            opacity=0.6,
            scale=tuple(np.asarray(truth_layer.scale) * self.downsample),
            translate=truth_layer.translate,
            units=truth_layer.units,
        )

    def _show_table(self) -> None:
        self.table.setRowCount(len(self.rows))
        for r, row in enumerate(self.rows):
            for c, key in enumerate(TABLE_COLUMNS):
                value = row[key]
                text = "" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
                self.table.setItem(r, c, QTableWidgetItem(text))

    def csv_text(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        return out.getvalue()

    def copy_csv(self) -> None:
        QApplication.clipboard().setText(self.csv_text())

    def save_csv(self, path: str | Path, *, overwrite: bool = False) -> bool:
        """Write the table; an existing file is kept unless `overwrite` (the Save dialog asks first)."""
        try:
            atomic_write_bytes(path, self.csv_text().encode(), overwrite=overwrite)
        except AnnotationError as exc:
            self.summary.setText(f"Not saved: {exc}")
            return False
        return True

    def _ask_save_csv(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the object table", "objects.csv", "CSV (*.csv)")
        if path:
            self.save_csv(path, overwrite=True)  # the dialog has asked before replacing a file

    def jump_to_row(self, row: int, _column: int = 0) -> None:
        """Centre the view on the object of a table row."""
        entry = self.rows[row]
        layer = chosen(self.truth_combo if entry["side"] == "truth" else self.pred_combo, self._labels_layers())
        if layer is None:
            return
        data = _comparable(layer, self.downsample)
        centre = np.asarray(ndimage.center_of_mass(data == entry["id"])) * self.downsample
        world = np.asarray(layer.data_to_world(centre))
        _camera(self.viewer).center = tuple(world)
        self.viewer.layers.selection.active = layer


def _camera(viewer):
    """napari 0.9 moved the camera to viewer.scene; older versions keep viewer.camera."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _level0_shape(layer) -> tuple[int, ...]:
    return tuple((layer.data[0] if layer.multiscale else layer.data).shape)


def _downsample_for(shape: tuple[int, ...]) -> int:
    """1, or the power of two that brings the image under MAX_PIXELS (a whole-slide layer)."""
    d = 1
    while np.prod(shape) / (d * d) > MAX_PIXELS:
        d *= 2
    return d


def _comparable(layer, downsample: int) -> np.ndarray:
    """The labels at 1/downsample: a pyramid level when the layer has it, else every n-th pixel (lazily)."""
    if layer.multiscale:
        for level in layer.data:
            if level.shape[-1] == -(-layer.data[0].shape[-1] // downsample):
                return np.asarray(level)
        data = layer.data[0]
    else:
        data = layer.data
    return np.asarray(data[::downsample, ::downsample])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
