""" "Train" dock widget: train or fine-tune a glomerulus network from layers or files, with a live plot.

Training runs in a napari worker; each batch and each epoch come back through Qt
signals (queued to the GUI thread), Stop is checked between batches, and a
stopped run resumes on the next Start with the same settings.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import QPointF, Signal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ...annotations import AnnotationError
from ...io import SlideError
from ...models import ARCHITECTURES, ModelError
from ...pipelines.export import ExportError, Item
from ...training import TrainingError
from ...training.errors import resumable
from ._layers import UserFailure, catching, chosen, labels_layers, refill, slide_layers

if TYPE_CHECKING:
    import napari

SOURCES = ("slide and labels layers", "files")
ERRORS = (TrainingError, ModelError, ExportError, AnnotationError, SlideError, OSError, ValueError)


class CurvePlot(QWidget):
    """Training loss (blue) and validation Dice (orange) per epoch, drawn with QPainter: no plotting dependency."""

    def __init__(self) -> None:
        super().__init__()
        self.setMinimumHeight(120)
        self.loss: list[float] = []
        self.dice: list[float] = []

    def add(self, loss: float, dice: float) -> None:
        self.loss.append(loss)
        self.dice.append(dice)
        self.update()

    def clear(self) -> None:
        self.loss, self.dice = [], []
        self.update()

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor(30, 30, 30))
        top = max(self.loss, default=1.0) or 1.0
        for values, colour, scale in ((self.loss, QColor(80, 160, 255), top), (self.dice, QColor(255, 160, 40), 1.0)):
            if len(values) < 2:
                continue
            w, h = self.width() - 10, self.height() - 10
            points = [QPointF(5 + w * i / (len(values) - 1), 5 + h * (1 - v / scale)) for i, v in enumerate(values)]
            painter.setPen(QPen(colour, 2))
            painter.drawPolyline(QPolygonF(points))
        painter.setPen(QColor(200, 200, 200))
        painter.drawText(8, 16, "loss" + (f" {self.loss[-1]:.3f}" if self.loss else ""))
        painter.drawText(8, 32, "val Dice" + (f" {self.dice[-1]:.3f}" if self.dice else ""))
        painter.end()


class TrainWidget(QWidget):
    stepped = Signal(object)
    epoch_done = Signal(object)

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.source_combo = QComboBox()
        self.source_combo.addItems(SOURCES)
        self.slide_combo, self.labels_combo = QComboBox(), QComboBox()
        self.annotations_edit, self.images_edit = QLineEdit(), QLineEdit()
        self.annotations_edit.setPlaceholderText("annotation file or folder")
        self.images_edit.setPlaceholderText("image / slide, or a folder of them")
        self.image_mpp_spin = _spin(0.0, 50.0, 0.0, decimals=3, special="from the files")
        self.arch_combo = QComboBox()
        self.arch_combo.addItems(ARCHITECTURES)
        self.encoder_edit = QLineEdit()
        self.encoder_edit.setPlaceholderText("default for the architecture")
        self.classes_edit = QLineEdit("glomerulus")
        self.from_edit = QLineEdit()
        self.from_edit.setPlaceholderText("fine-tune this checkpoint, or 'default' (empty: fresh weights)")
        self.freeze_check = QCheckBox("freeze the encoder")
        self.mpp_spin = _spin(0.05, 20.0, 1.0, decimals=3)
        self.tile_spin = _int_spin(64, 8192, 1024)
        self.overlap_spin = _int_spin(0, 4096, 256)
        self.input_spin = _int_spin(32, 2048, 320)
        self.epochs_spin = _int_spin(1, 10000, 30)
        self.batch_spin = _int_spin(1, 512, 8)
        self.lr_spin = _spin(1e-6, 1.0, 1e-4, decimals=6)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("checkpoint folder to write")
        self.start_button, self.stop_button = QPushButton("Start"), QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.plot = CurvePlot()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Training data", self.source_combo)
        form.addRow("Slide layer", self.slide_combo)
        form.addRow("Labels layer", self.labels_combo)
        form.addRow("Annotations", self.annotations_edit)
        form.addRow("Images", self.images_edit)
        form.addRow("Image µm/px", self.image_mpp_spin)
        form.addRow("Architecture", self.arch_combo)
        form.addRow("Encoder", self.encoder_edit)
        form.addRow("Classes", self.classes_edit)
        form.addRow("Start from", self.from_edit)
        form.addRow("", self.freeze_check)
        form.addRow("Tile µm/px", self.mpp_spin)
        form.addRow("Tile / overlap", _row(self.tile_spin, self.overlap_spin))
        form.addRow("Network input", self.input_spin)
        form.addRow("Epochs / batch", _row(self.epochs_spin, self.batch_spin))
        form.addRow("Peak learning rate", self.lr_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Output", self.out_edit)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(_row(self.start_button, self.stop_button))
        layout.addWidget(self.plot)
        layout.addWidget(self.status)
        layout.addStretch()

        self._stop = threading.Event()
        self._worker = None
        self.result = None
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.stepped.connect(self._show_step)
        self.epoch_done.connect(self._show_epoch)
        self.source_combo.currentTextChanged.connect(self._show_source)
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self._refresh()
        self._show_source()

    def _refresh(self, *_: object) -> None:
        refill(self.slide_combo, [layer.name for layer in slide_layers(self.viewer)])
        refill(self.labels_combo, [layer.name for layer in labels_layers(self.viewer)])

    def _show_source(self, *_: object) -> None:
        layers = self.source_combo.currentText() == SOURCES[0]
        for widget in (self.slide_combo, self.labels_combo):
            widget.setEnabled(layers)
        for widget in (self.annotations_edit, self.images_edit, self.image_mpp_spin):
            widget.setEnabled(not layers)

    def options(self) -> dict:
        from ...training import Recipe

        out = self.out_edit.text().strip()
        if not out:
            raise TrainingError("choose an output checkpoint folder")
        init = self.from_edit.text().strip() or None
        classes = [c.strip() for c in self.classes_edit.text().split(",") if c.strip()]
        return {
            "out": Path(out),
            "arch": None if init else self.arch_combo.currentText(),
            "encoder": self.encoder_edit.text().strip() or None,
            "classes": None if init else classes or None,
            "init": init,
            # fine-tuning keeps the checkpoint's scale and sizes: the network learned them
            "mpp": None if init else self.mpp_spin.value(),
            "tile": None if init else self.tile_spin.value(),
            "overlap": None if init else self.overlap_spin.value(),
            "input_size": None if init else self.input_spin.value(),
            "device": self.device_combo.currentText(),
            "recipe": Recipe(
                epochs=self.epochs_spin.value(),
                batch_size=self.batch_spin.value(),
                lr=self.lr_spin.value(),
                freeze_encoder=self.freeze_check.isChecked(),
            ),
        }

    def layer_items(self) -> list[Item]:
        """The chosen slide layer and Labels layer as one training source, in level-0 pixels."""
        from ..layer_annotations import labels_to_annotations

        slide_layer = chosen(self.slide_combo, slide_layers(self.viewer))
        labels = chosen(self.labels_combo, labels_layers(self.viewer))
        if slide_layer is None or labels is None:
            raise TrainingError("choose a slide layer and a Labels layer drawn on it")
        slide = slide_layer.metadata["slide"]
        data, meta, _ = labels.as_layer_data_tuple()
        annotations = labels_to_annotations(data, meta, slide.mpp)
        name = Path(slide.source).stem
        return [Item(name, annotations, None, slide.level_shapes[0], slide.mpp, Path(slide.source))]

    def start(self) -> None:
        from napari.qt.threading import create_worker

        from ...pipelines.train import train_from_files, train_items

        try:
            options = self.options()
            out = options.pop("out")
            resume = resumable(out)
            callbacks = {"on_step": self.stepped.emit, "on_epoch": self.epoch_done.emit, "stop": self._stop.is_set}
            if self.source_combo.currentText() == SOURCES[0]:
                items = self.layer_items()

                def job():
                    return train_items(items, out, data={"napari": "layers"}, resume=resume, **options, **callbacks)
            else:
                annotations, images = self.annotations_edit.text().strip(), self.images_edit.text().strip()
                if not annotations or not images:
                    raise TrainingError("give the annotations and the images")
                image_mpp = self.image_mpp_spin.value() or None

                def job():
                    return train_from_files(
                        annotations, images, out, image_mpp=image_mpp, resume=resume, **options, **callbacks
                    )
        except ERRORS as exc:
            self.status.setText(str(exc))
            return
        self._stop.clear()
        self.plot.clear()
        self.result = None
        self._worker = create_worker(catching(job, ERRORS))
        self._worker.returned.connect(self._finished)
        self._worker.errored.connect(self._failed)
        self._worker.finished.connect(self._idle)
        self.start_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.status.setText("Resuming…" if resume else "Cutting tiles…")
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self.status.setText("Stopping after the current batch…")

    def _show_step(self, step) -> None:
        if not self._stop.is_set():
            self.status.setText(f"epoch {step.epoch}: batch {step.step} / {step.steps}, loss {step.loss:.3f}")

    def _show_epoch(self, epoch) -> None:
        self.plot.add(epoch.train_loss, epoch.val_dice)

    def _finished(self, result) -> None:
        if isinstance(result, UserFailure):
            self.status.setText(result)
            return
        self.result = result
        if result.path is None:
            self.status.setText(f"Stopped after epoch {len(result.history)}; Start resumes.")
        else:
            self.status.setText(
                f"Done: {result.path} (best epoch {result.best_epoch}, validation Dice {result.best_dice:.3f})."
            )

    def _failed(self, exc: Exception) -> None:
        self.status.setText(f"Failed: {exc.__class__.__name__}: {exc}")  # a bug, not a user's mistake

    def _idle(self) -> None:
        self.start_button.setEnabled(True)
        self.stop_button.setEnabled(False)


def _row(*widgets) -> QHBoxLayout:
    row = QHBoxLayout()
    for widget in widgets:
        row.addWidget(widget)
    return row


def _spin(lo: float, hi: float, value: float, decimals: int = 2, special: str | None = None) -> QDoubleSpinBox:
    spin = QDoubleSpinBox(decimals=decimals, minimum=lo, maximum=hi)
    spin.setValue(value)
    if special:
        spin.setSpecialValueText(special)
    return spin


def _int_spin(lo: int, hi: int, value: int) -> QSpinBox:
    spin = QSpinBox(minimum=lo, maximum=hi)
    spin.setValue(value)
    return spin


__all__ = ["CurvePlot", "TrainWidget"]
