""" "Compare" dock widget: a prediction Labels layer against a ground-truth one.

Adds the TP/FP/FN layer (green, yellow, red, as in the paper's figures) and a
table of objects; clicking a row centres the view on that object. The two may be
at different scales (a whole-slide result at the model's scale against a
full-resolution truth): the coarser is looked up, nearest neighbour, on the finer
one's grid. The truth may also be polygons (a Shapes layer): they are drawn on
the prediction's grid.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
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
from ...pipelines.evaluate import Labels, Upsampled, covers
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
        self.views: Views | None = None  # what the last comparison compared, on one grid

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

    def _truth_layers(self):
        """Labels layers, and Shapes layers of polygons (annotations opened from a file, or drawn)."""
        from napari.layers import Shapes

        return [*self._labels_layers(), *(layer for layer in self.viewer.layers if isinstance(layer, Shapes))]

    def _refresh(self, *_: object) -> None:
        refill(self.pred_combo, [layer.name for layer in self._labels_layers()], default=0)
        refill(self.truth_combo, [layer.name for layer in self._truth_layers()], default=1)

    def compare(self) -> None:
        pred_layer, truth_layer = (
            chosen(self.pred_combo, self._labels_layers()),
            chosen(self.truth_combo, self._truth_layers()),
        )
        if pred_layer is None or truth_layer is None:
            self.summary.setText("Choose a prediction Labels layer and a ground-truth Labels or Shapes layer.")
            return
        views = comparable_views(pred_layer, truth_layer)
        if isinstance(views, str):
            self.summary.setText(views)
            return
        self.views = views
        pred, truth, grid, d = views.pred, views.truth, views.grid, views.downsample
        pixel = pixel_scores(pred, truth)
        result = match_instances(pred, truth, self.iou_spin.value())
        mpp = float(grid.scale[-1]) * d if str(grid.units[-1]) == "micrometer" else None
        classes = views.truth_classes
        self.rows = object_table(result, truth_classes=classes if isinstance(classes, dict) else None, mpp=mpp)
        self._show_table()
        self._show_map(tp_fp_fn_map(pred, truth), pred_layer, truth_layer, views)
        note = (
            f"Computed at 1/{d} resolution: the layers are too large to compare whole in memory; "
            "`nephro evaluate` scores full resolution.  |  "
            if d > 1
            else ""
        )
        self.summary.setText(
            note
            + f"Dice {_fmt(pixel.dice)}  IoU {_fmt(pixel.iou)}  |  objects: {result.n_true} true, {result.n_pred} predicted, "
            f"TP {result.tp}, FP {result.fp}, FN {result.fn}  |  precision {_fmt(result.precision)}, "
            f"recall {_fmt(result.recall)}, F1 {_fmt(result.f1)}, PQ {_fmt(result.panoptic_quality)}"
        )

    def _show_map(self, agreement: np.ndarray, pred_layer, truth_layer, views: Views) -> None:
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
            scale=tuple(np.asarray(views.grid.scale) * views.downsample),
            translate=views.grid.translate,
            units=views.grid.units,
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
        views = self.views
        if views is None:
            return
        data = views.truth if entry["side"] == "truth" else views.pred
        centre = np.asarray(ndimage.center_of_mass(data == entry["id"])) * views.downsample
        world = np.asarray(views.grid.data_to_world(centre))
        _camera(self.viewer).center = tuple(world)
        layer = views.truth_layer if entry["side"] == "truth" else views.pred_layer
        if layer in self.viewer.layers:
            self.viewer.layers.selection.active = layer


def _camera(viewer):
    """napari 0.9 moved the camera to viewer.scene; older versions keep viewer.camera."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


@dataclass
class Views:
    """The two sides of a comparison on one grid: the finer layer's (`grid`), every `downsample`-th pixel."""

    pred: np.ndarray
    truth: np.ndarray
    grid: object  # the layer whose pixels these are (every downsample-th)
    downsample: int
    truth_classes: dict | None
    pred_layer: object
    truth_layer: object


def comparable_views(pred_layer, truth_layer) -> Views | str:
    """Both layers on the finer one's grid, or why they cannot be compared (one line)."""
    from napari.layers import Shapes

    if isinstance(truth_layer, Shapes):
        return _against_polygons(pred_layer, truth_layer)
    shapes = (_level0_shape(pred_layer), _level0_shape(truth_layer))
    classes = truth_layer.metadata.get("classes")
    if shapes[0] == shapes[1]:
        d = _downsample_for(shapes[1])
        pred, truth = _comparable(pred_layer, d), _comparable(truth_layer, d)
        return Views(pred, truth, truth_layer, d, classes, pred_layer, truth_layer)
    factor = _world_ratio(pred_layer, truth_layer)  # truth pixels per prediction pixel
    refused = f"The layers differ in shape ({shapes[0]} vs {shapes[1]}) and scale: they must cover the same image."
    if factor is None:
        return refused
    swap = factor < 1  # the truth is the coarser side
    fine, coarse, f = (pred_layer, truth_layer, 1 / factor) if swap else (truth_layer, pred_layer, factor)
    fine_shape, coarse_shape = shapes if swap else shapes[::-1]
    if not covers(fine_shape, f, coarse_shape):
        return refused
    d = _downsample_for(fine_shape)
    on_grid, looked_up = _comparable(fine, d), _coarse_view(coarse, fine_shape, f, d)
    pred, truth = (on_grid, looked_up) if swap else (looked_up, on_grid)
    return Views(pred, truth, fine, d, classes, pred_layer, truth_layer)


def _world_ratio(a, b) -> float | None:
    """Pixels of `b` per pixel of `a` in the world (their scales), when both are in the same units."""
    if str(a.units[-1]) != str(b.units[-1]) or not (a.scale[-1] > 0 and b.scale[-1] > 0):
        return None
    ratio = float(a.scale[-1]) / float(b.scale[-1])
    return None if abs(ratio - 1) < 1e-9 else ratio


def _coarse_view(layer, fine_shape: tuple[int, ...], factor: float, downsample: int) -> np.ndarray:
    """A coarse layer looked up on the fine grid at 1/downsample, from its coarsest level still fine enough."""
    levels = list(layer.data) if layer.multiscale else [layer.data]
    level, step = levels[0], 1.0
    for candidate in levels[1:]:
        f = levels[0].shape[-1] / candidate.shape[-1]
        if factor * f <= downsample and f > step:
            level, step = candidate, f
    view = Upsampled(Labels(level, None, []), fine_shape, factor * step)
    return np.asarray(view[::downsample, ::downsample])


def _against_polygons(pred_layer, shapes_layer) -> Views | str:
    """Polygons of a Shapes layer drawn on the prediction's grid (level-0 pixels: the Shapes layer's own)."""
    from ...annotations import rasterize
    from ..layer_annotations import shapes_to_annotations

    if str(pred_layer.units[-1]) != str(shapes_layer.units[-1]):
        return "The prediction and the polygons are in different units: open both over the same slide."
    meta = {
        "scale": shapes_layer.scale,
        "translate": shapes_layer.translate,
        "features": shapes_layer.features,
        "shape_type": shapes_layer.shape_type,
    }
    level0 = float(shapes_layer.scale[-1])  # world units per level-0 pixel: annotations sit on the slide's scale
    annotations = shapes_to_annotations(shapes_layer.data, meta, slide_mpp=level0)
    d = _downsample_for(_level0_shape(pred_layer))
    pred = _comparable(pred_layer, d)
    step = float(pred_layer.scale[-1]) / level0  # level-0 pixels per prediction pixel
    corner = (np.asarray(pred_layer.translate[-2:], float) - (float(pred_layer.scale[-1]) - level0) / 2) / level0
    truth = rasterize(annotations, pred.shape, downsample=step * d, origin=(float(corner[1]), float(corner[0])))
    classes = {i: a.label for i, a in enumerate(annotations, start=1)}
    return Views(pred, np.asarray(truth), pred_layer, d, classes, pred_layer, shapes_layer)


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
