""" "Segment" dock widget: a checkpoint over the view, a drawn rectangle, or the whole slide.

The run happens in a napari `thread_worker`; progress comes back through a Qt
signal (queued to the GUI thread) and napari's own progress bar, Cancel is checked
between batches, and the result is a Labels layer placed exactly over the slide.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ...common.text import duration
from ...inference import Progress, SegmentError, partial_path
from ...io import SlideError
from ...models import ModelError
from ._layers import UserFailure, catching, chosen, refill, slide_layers
from ._wrapping import WrappingLabel

if TYPE_CHECKING:
    import napari

WHERE = ("visible field of view", "Shapes rectangle", "whole slide")
REGION_PIXELS = 16 * 2**20  # a region result beyond this is shown at a coarser scale
ERRORS = (SegmentError, ModelError, SlideError, OSError)


class SegmentWidget(QWidget):
    progressed = Signal(object)
    errors = ERRORS  # the users' mistakes: shown in the status line, never as a traceback

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.slide_combo = QComboBox()
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("checkpoint folder (config.json + model.safetensors), or 'default'")
        self.model_edit.setText("default")  # the glomerulus model shipped with the plugin
        self.browse_button = QPushButton("Browse…")
        self.model_info = WrappingLabel("")  # a description, or why the folder is not a model: wraps, never clipped
        self.where_combo = QComboBox()
        self.where_combo.addItems(WHERE)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.batch_spin = QSpinBox(minimum=1, maximum=256, value=4)
        self.threshold_spin = QDoubleSpinBox(decimals=2, minimum=0.01, maximum=0.99, singleStep=0.05, value=0.5)
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("whole slide: OME-Zarr to write (default beside the slide)")
        self.overwrite_check = QCheckBox("replace an existing result")
        self.full_check = QCheckBox("at full resolution")  # else at the model's scale: a fraction of the time
        self.full_check.setToolTip(
            "write the whole-slide result at the slide's own resolution; by default it is written at the model's "
            "scale (e.g. 16 times fewer pixels for a 1 µm/px model on a 0.25 µm/px slide), placed over the slide all "
            "the same"
        )
        self.objects_check = QCheckBox("whole objects")  # enabled by `_describe_model` for a model with rules
        self.objects_check.setEnabled(False)
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.warning = WrappingLabel("")  # when what was found cannot be right
        self.warning.setStyleSheet("color: #e8a33d")
        self.warning.hide()

        model_row = QHBoxLayout()
        model_row.addWidget(self.model_edit)
        model_row.addWidget(self.browse_button)
        self.form = form = QFormLayout()
        form.addRow("Slide", self.slide_combo)
        form.addRow("Model", model_row)
        form.addRow("", self.model_info)
        form.addRow("Where", self.where_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Threshold", self.threshold_spin)
        form.addRow("", self.objects_check)
        form.addRow("Whole-slide output", self.out_edit)
        form.addRow("", self.full_check)
        form.addRow("", self.overwrite_check)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.warning)
        layout.addStretch()

        self._segmenter = None
        self._segmenter_key: tuple[str, str] | None = None
        self._cancel = threading.Event()
        self._worker = None
        self._bar = None
        self.result_layer = None
        self.browse_button.clicked.connect(self._browse)
        self.model_edit.editingFinished.connect(self._describe_model)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.progressed.connect(self._show_progress)
        self._describe_model()
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self._refresh()

    # -- choices -------------------------------------------------------------
    def _refresh(self, *_: object) -> None:
        refill(self.slide_combo, [layer.name for layer in slide_layers(self.viewer)])

    def slide_layer(self):
        return chosen(self.slide_combo, slide_layers(self.viewer))

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Checkpoint folder")
        if folder:
            self.model_edit.setText(folder)
            self._describe_model()

    def _describe_model(self) -> None:
        from ...models import ModelConfig, resolve_checkpoint

        text = self.model_edit.text().strip()
        if not text:
            return
        try:
            config = ModelConfig.from_file(resolve_checkpoint(text) / "config.json")
        except ModelError as exc:
            self.model_info.setText(str(exc))
            self._offer_objects(False)
            return
        self.model_info.setText(
            f"{config.arch} ({config.encoder}), classes: {', '.join(config.classes)}; "
            f"{config.tile_size} px tiles at {config.mpp:g} um/px, network input {config.input_size} px"
        )
        self._offer_objects(config.objects is not None)

    def _offer_objects(self, has_rules: bool) -> None:
        """'whole objects' is on for a model with object rules, and cannot be ticked for one without."""
        self.objects_check.setEnabled(has_rules)
        self.objects_check.setChecked(has_rules)
        self.objects_check.setToolTip(
            "fill holes, drop specks, split touching objects and smooth outlines, by the model's rules"
            if has_rules
            else "this model has no object rules: its pixel map is kept as it is"
        )

    def segmenter(self):
        """The checkpoint, loaded once per folder and device."""
        from ...models import TorchSegmenter

        key = (self.model_edit.text().strip(), self.device_combo.currentText())
        if not key[0]:
            raise ModelError("choose a checkpoint folder first")
        return self._cached(key, lambda: TorchSegmenter.from_checkpoint(key[0], device=key[1]))

    def _cached(self, key: tuple, load):
        """The model loaded for `key`, loading it again only when the key changes."""
        if self._segmenter is None or key != self._segmenter_key:
            self._segmenter = load()
            self._segmenter_key = key
        return self._segmenter

    def batch_size(self) -> int:
        """Tiles per forward pass."""
        return self.batch_spin.value()

    def region(self, layer) -> tuple[float, float, float, float] | None:
        """The level-0 box (x, y, w, h) to segment; None for the whole slide."""
        where = self.where_combo.currentText()
        if where == "whole slide":
            return None
        if where == "Shapes rectangle":
            return _rectangle(self.viewer, layer)
        return _field_of_view(self.viewer, layer)

    def output_path(self, layer) -> Path:
        text = self.out_edit.text().strip()
        if text:
            return Path(text)
        slide = layer.metadata["slide"]
        model = Path(self.model_edit.text().strip()).name or "segmentation"
        return Path(slide.source).with_name(f"{Path(slide.source).stem}.{model}.zarr")

    # -- running ---------------------------------------------------------------
    def run(self) -> None:
        from napari.qt.threading import create_worker

        layer = self.slide_layer()
        if layer is None:
            self.status.setText("Open a slide first.")
            return
        try:
            if not self.ready(layer):
                return
            job = self._job(layer)
        except self.errors as exc:
            self.status.setText(str(exc))
            return
        self._cancel.clear()
        self._worker = create_worker(catching(job, self.errors))
        self._worker.returned.connect(lambda result: self._finished(layer, result))
        self._worker.errored.connect(self._failed)
        self._worker.finished.connect(self._idle)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText("Planning tiles…")
        self._show_warning(None)
        self._worker.start()

    def ready(self, layer) -> bool:
        """The last word before a run starts: a subclass may hold it back (e.g. to show its cost first)."""
        return True

    def _job(self, layer):
        """The work for the thread, with every question about the inputs answered here; the model
        itself is loaded in the thread (a large checkpoint takes seconds to read and hash)."""
        from ...inference import segment_region, segment_slide

        slide = layer.metadata["slide"]
        if not self.model_edit.text().strip():
            raise ModelError("choose a checkpoint folder first")
        if slide.mpp is None:
            raise SegmentError(f"{slide.source.name}: its pixel size is unknown; set it in Slide info first")
        common = {
            "threshold": self.threshold_spin.value(),
            "batch_size": self.batch_size(),
            "progress": self.progressed.emit,
            "cancel": self._cancel.is_set,
            "objects": "model" if self.objects_check.isChecked() else None,
        }
        region = self.region(layer)
        if region is None:
            out = self.output_path(layer)
            resume = partial_path(out).exists() and not self.overwrite_check.isChecked()
            overwrite = self.overwrite_check.isChecked()
            scale = self.out_scale()
            return lambda: (
                "slide",
                segment_slide(
                    slide, self.segmenter(), out, out_downsample=scale, resume=resume, overwrite=overwrite, **common
                ),
            )
        _, _, w, h = region
        downsample = 2 ** max(0, math.ceil(math.log2(math.sqrt(w * h / REGION_PIXELS)))) if w * h else 1
        return lambda: ("region", segment_region(slide, self.segmenter(), region, out_downsample=downsample, **common))

    def out_scale(self) -> str:
        """The whole-slide output's scale: the model's working grid (default) or the slide's full resolution."""
        from ...inference.plan import FULL, WORKING

        return FULL if self.full_check.isChecked() else WORKING

    def cancel(self) -> None:
        self._cancel.set()
        self.status.setText("Cancelling after the current batch…")

    def _show_progress(self, p: Progress) -> None:
        from napari.utils import progress

        if self._bar is None:
            self._bar = progress(total=p.total, desc="Segment")
        self._bar.update(p.done - self._bar.n)
        eta = "" if p.eta_seconds is None else f", about {duration(p.eta_seconds)} left"
        self.status.setText(f"{p.done} / {p.total} tiles, {p.tiles_per_second:.2f} tiles/s{eta}")

    def _finished(self, layer, outcome) -> None:
        if isinstance(outcome, UserFailure):
            self.status.setText(outcome)
            return
        kind, result = outcome
        stats = result.stats
        note = f"{stats.tiles} tiles ({stats.skipped} glass skipped) in {duration(stats.seconds)}"
        if kind == "slide":
            if result.path is None:
                self.status.setText(
                    f"Cancelled: {result.rows_done} of {result.rows} rows kept in {result.partial.name}; Run resumes."
                )
                return
            self.result_layer = self._add_slide_result(layer, result.path)
            self.status.setText(f"Done: {result.path} ({note}).{_found(result.summary)}")
            self._show_warning(result.summary)
            return
        if not stats.complete:
            self.status.setText("Cancelled: nothing added.")
            return
        self.result_layer = self._add_region_result(layer, result)
        self.status.setText(f"Done: {self.result_layer.name} ({note}).{_found(result.summary)}")
        self._show_warning(result.summary)

    def _show_warning(self, summary) -> None:
        """The summary's warning under the status line, and as a napari notification; hidden when there is none."""
        text = None if summary is None else summary.warning()
        self.warning.setText(text or "")
        self.warning.setVisible(bool(text))
        if text:
            from napari.utils.notifications import show_warning

            show_warning(text)

    def _add_region_result(self, layer, result):
        x, y, _, _ = result.region
        name = f"{_model_name(self)} segmentation"
        return self._add_labels(layer, result.array, (y, x), result.out_downsample, result.classes, name)

    def _add_slide_result(self, layer, path: Path):
        from ...annotations.omezarr import read_label_zarr

        pyramid = read_label_zarr(path)
        return self._add_labels(
            layer, pyramid.levels, (0, 0), slide_downsample(layer, pyramid), pyramid.classes, path.name
        )

    def _add_labels(self, layer, data, origin_yx, downsample: float, classes: dict[int, str], name: str):
        """A Labels layer over `layer` (see `aligned`), multiscale when `data` is a list of levels."""
        scale, translate = aligned(layer, origin_yx, downsample)
        values = sorted(classes)
        return self.viewer.add_labels(
            data,
            multiscale=isinstance(data, list),
            name=name,
            scale=scale,
            translate=translate,
            units=tuple(str(u) for u in layer.units),
            features={"index": values, "class": [classes[v] for v in values]},
            metadata={"classes": classes},
        )

    def _failed(self, exc: Exception) -> None:
        self.status.setText(f"Failed: {exc.__class__.__name__}: {exc}")  # a bug, not a user's mistake

    def _idle(self) -> None:
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def slide_downsample(layer, pyramid) -> float:
    """Slide pixels per pixel of a whole-slide result: as its run recorded it, else from the widths."""
    if pyramid.slide_shape is not None:
        return pyramid.slide_downsample
    return layer.metadata["slide"].level_shapes[0][1] / pyramid.levels[0].shape[1]


def aligned(layer, origin_yx: tuple[float, float], downsample: float) -> tuple[tuple, tuple]:
    """Scale and translate that put a result's pixel (0, 0) over level-0 pixel `origin_yx` of the slide layer.

    A result pixel covers `downsample` level-0 pixels; napari places a pixel by its
    centre, so the translate carries half a result pixel less half a level-0 pixel.
    """
    scale = np.asarray(layer.scale[-2:], float)
    translate = np.asarray(layer.translate[-2:], float)
    origin = np.asarray(origin_yx, float) + (downsample - 1) / 2
    return tuple(scale * downsample), tuple(translate + scale * origin)


def _field_of_view(viewer, layer) -> tuple[float, float, float, float]:
    """The part of the slide on screen, in level-0 pixels: the camera's centre and zoom over the canvas size."""
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9 moved it
    size = viewer.canvas.size if hasattr(viewer, "canvas") else viewer._canvas_size  # (height, width) on screen
    half = np.asarray(size, float) / camera.zoom / 2  # world units, (y, x)
    center = np.asarray(camera.center[-2:], float)
    corners = [layer.world_to_data(center + sign * half)[-2:] for sign in (-1, 1)]
    (y0, x0), (y1, x1) = np.minimum(*corners), np.maximum(*corners)
    height, width = layer.metadata["slide"].level_shapes[0]
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise SegmentError("the view shows nothing of the slide: pan or zoom onto it first")
    return (x0, y0, x1 - x0, y1 - y0)


def _rectangle(viewer, slide_layer) -> tuple[float, float, float, float]:
    """The selected rectangle of the active Shapes layer (else its last one), as a level-0 box."""
    from napari.layers import Shapes

    layer = viewer.layers.selection.active
    if not isinstance(layer, Shapes):
        layer = next((lyr for lyr in reversed(viewer.layers) if isinstance(lyr, Shapes)), None)
    if layer is None or not len(layer.data):
        raise SegmentError("draw a rectangle in a Shapes layer first (or choose another 'Where')")
    index = max(layer.selected_data) if layer.selected_data else len(layer.data) - 1
    world = np.asarray([layer.data_to_world(p) for p in np.asarray(layer.data[index])[:, -2:]])
    pixels = np.asarray([slide_layer.world_to_data(p) for p in world])[:, -2:]
    (y0, x0), (y1, x1) = pixels.min(axis=0), pixels.max(axis=0)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise SegmentError("the chosen shape has no area")
    return (x0, y0, x1 - x0, y1 - y0)


def _found(summary) -> str:
    """' 12 glomeruli found, …' after the status line, when the run says what it found."""
    if summary is None:
        return ""
    text = summary.describe()
    return f" {text[0].upper()}{text[1:]}."


def _model_name(widget: SegmentWidget) -> str:
    return Path(widget.model_edit.text().strip()).name or "model"
