""" "Review" dock widget: rate each model's prediction per patch with keys, settle disagreements, correct the
hard patches, see the figures, fine-tune and run the new model for a second round.

Everything it reads and writes is a review project (`review.layout`); the work is
the library's (`review.consensus`, `stats`, `figures`, `sets`, `export`,
`finetune`, `pipelines.review.add_model`), this widget only shows and asks.

Blinding: a rater's ratings are read from their own file only
(`read_ratings(root, rater)`); the disagreement list, which shows every rater's
rating, is offered to the adjudicator alone (rater name `adjudicated`), whose
keys then settle the pair in focus. Keys (bound on the viewer and on the
widget's own layers, so they win over a layer's mode keys): 1 / 2 / 3 rate the
model in focus good / medium / bad and move the focus to the next unrated model;
Left / Right go to the previous / next patch; Up / Down change the model in
focus; A shows every model's outlines or only the focused one's.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ...models import ModelError
from ...review import layout
from ...review.layout import ADJUDICATOR, ReviewError
from ...training import TrainingError
from ._layers import UserFailure, catching, refill
from ._wrapping import WrappingLabel

if TYPE_CHECKING:
    import napari

ERRORS = (ReviewError, TrainingError, ModelError, OSError, ValueError)
IMAGE = "patch"
CORRECTION = "correction"
KEYS = {"1": "good", "2": "medium", "3": "bad"}


class ReviewWidget(QWidget):
    progressed = Signal(str, int, int)  # stage, done, total: from the fine-tune worker, queued to the GUI thread

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.root: Path | None = None
        self.project: layout.Project | None = None
        self.patches: list[str] = []
        self.index = 0
        self.ratings: dict[tuple[str, str], str] = {}
        self.correcting: list[str] | None = None  # the hard patches left to correct, in correction mode
        self.started_from = ""
        self.stats_text = ""  # the shown patch's measured counts: read and matched once per patch shown
        self.result = None  # the fine-tune's last outcome: a ModelEntry, None (stopped) or a UserFailure
        self._stop = threading.Event()
        self._worker = None

        self.project_edit = QLineEdit()
        self.project_edit.setPlaceholderText("review project folder (nephro review new)")
        self.browse_button, self.open_button = QPushButton("…"), QPushButton("Open")
        self.rater_edit = QLineEdit()
        self.rater_edit.setPlaceholderText(f"your rater name ({ADJUDICATOR!r} settles disagreements)")
        self.focus_combo = QComboBox()
        self.all_check = QCheckBox("show every model (A)")
        self.patch_label = WrappingLabel("")
        self.counter_label = QLabel("")
        self.stats_label = WrappingLabel("")
        self.rated_label = WrappingLabel("")
        self.rate_buttons = {r: QPushButton(f"{k} {r}") for k, r in KEYS.items()}
        self.prev_button, self.next_button = QPushButton("◀ patch"), QPushButton("patch ▶")
        self.disagreements_list = QListWidget()
        self.disagreements_list.setMaximumHeight(120)
        self.disagreements_label = WrappingLabel("")
        self.results_button = QPushButton("Results: fuse and show the figures")
        self.results_label = WrappingLabel("")
        self.results_dialog: QDialog | None = None
        self.correct_button = QPushButton("Correct hard patches")
        self.save_button, self.skip_button = QPushButton("Save correction"), QPushButton("Skip")
        self.done_button = QPushButton("Back to rating")
        self.correction_label = WrappingLabel("")
        self.tune_combo = QComboBox()
        self.epochs_spin, self.steps_spin = _int_spin(1, 1000, 10), _int_spin(0, 100000, 0, "default")
        self.batch_spin, self.crop_spin = _int_spin(0, 512, 0, "default"), _int_spin(0, 4096, 0, "default")
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.tune_button, self.cancel_button = QPushButton("Fine-tune and add"), QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.tune_label = WrappingLabel("")
        self.status = WrappingLabel("")

        layout_ = QVBoxLayout(self)
        layout_.addLayout(_row(self.project_edit, self.browse_button, self.open_button))
        layout_.addWidget(self.rater_edit)
        layout_.addLayout(_row(QLabel("Model in focus"), self.focus_combo, self.all_check))
        layout_.addWidget(self.patch_label)
        layout_.addWidget(self.counter_label)
        layout_.addWidget(self.rated_label)
        layout_.addWidget(self.stats_label)
        layout_.addLayout(_row(*self.rate_buttons.values()))
        layout_.addLayout(_row(self.prev_button, self.next_button))
        box = QGroupBox("Disagreements")
        inner = QVBoxLayout(box)
        inner.addWidget(self.disagreements_label)
        inner.addWidget(self.disagreements_list)
        layout_.addWidget(box)
        layout_.addWidget(self.results_button)
        layout_.addWidget(self.results_label)
        box = QGroupBox("Correct the fused-bad patches (the hard set)")
        inner = QVBoxLayout(box)
        inner.addLayout(_row(self.correct_button, self.done_button))
        inner.addLayout(_row(self.save_button, self.skip_button))
        inner.addWidget(self.correction_label)
        layout_.addWidget(box)
        box = QGroupBox("Fine-tune on easy + hard, then rate the new model")
        inner = QVBoxLayout(box)
        inner.addLayout(_row(QLabel("Model"), self.tune_combo, QLabel("Device"), self.device_combo))
        inner.addLayout(_row(QLabel("Epochs"), self.epochs_spin, QLabel("Steps"), self.steps_spin))
        inner.addLayout(_row(QLabel("Batch"), self.batch_spin, QLabel("Crop"), self.crop_spin))
        inner.addLayout(_row(self.tune_button, self.cancel_button))
        inner.addWidget(self.progress)
        inner.addWidget(self.tune_label)
        layout_.addWidget(box)
        layout_.addWidget(self.status)
        layout_.addStretch()

        self.browse_button.clicked.connect(self._browse)
        self.open_button.clicked.connect(lambda: self.open_project(self.project_edit.text().strip()))
        self.rater_edit.editingFinished.connect(self._rater_edited)
        self.focus_combo.currentTextChanged.connect(lambda _: self._show_layers())
        self.all_check.toggled.connect(lambda _: self._show_layers())
        for rating, button in self.rate_buttons.items():
            button.clicked.connect(lambda _=False, r=rating: self.rate(r))
        self.prev_button.clicked.connect(self.previous_patch)
        self.next_button.clicked.connect(self.next_patch)
        self.disagreements_list.currentRowChanged.connect(self.show_disagreement)
        self.results_button.clicked.connect(self.show_results)
        self.correct_button.clicked.connect(self.start_correction)
        self.save_button.clicked.connect(self.save_correction)
        self.skip_button.clicked.connect(self.next_hard)
        self.done_button.clicked.connect(self.stop_correction)
        self.tune_button.clicked.connect(self.start_finetune)
        self.cancel_button.clicked.connect(self.cancel_finetune)
        self.progressed.connect(self._show_progress)
        self.bind_keys()
        self._enable()

    # -- keys ------------------------------------------------------------------
    def key_handlers(self) -> dict:
        """Key -> the method it calls: what the viewer and the widget's layers are bound to."""
        handlers = {key: (lambda _=None, r=rating: self.rate(r)) for key, rating in KEYS.items()}
        handlers |= {
            "Left": lambda _=None: self.previous_patch(),
            "Right": lambda _=None: self.next_patch(),
            "Up": lambda _=None: self.move_focus(-1),
            "Down": lambda _=None: self.move_focus(1),
            "A": lambda _=None: self.all_check.toggle(),
        }
        return handlers

    def bind_keys(self, layer=None) -> None:
        """Bind the rating keys on the viewer, or on `layer` (a layer's own keys would win over the viewer's)."""
        target = self.viewer if layer is None else layer
        for key, handler in self.key_handlers().items():
            target.bind_key(key, handler, overwrite=True)

    # -- project and rater -----------------------------------------------------
    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Review project folder")
        if path:
            self.project_edit.setText(path)
            self.open_project(path)

    def open_project(self, path, rater: str | None = None) -> bool:
        """Open the review project at `path` (and set the rater); shows the first patch the rater has not finished."""
        if rater is not None:
            self.rater_edit.setText(rater)
        try:
            root = Path(path).expanduser()
            project = layout.read_project(root)
            patches = [p.patch for p in layout.read_patches(root)]
            if not patches:
                raise ReviewError(f"{root}: the project has no patches")
            self.rater()  # a name given must be a valid one
        except ERRORS as exc:
            self.status.setText(str(exc))
            return False
        self.stop_correction()
        keep = {IMAGE, *project.model_names}
        for layer in [la for la in self.viewer.layers if la.metadata.get("review") and la.name not in keep]:
            self.viewer.layers.remove(layer)  # another project's models
        self.root, self.project, self.patches = root, project, patches
        self.project_edit.setText(str(root))
        self._fill_models()
        self._load_ratings()
        self.show_patch(self.first_unfinished())
        self.refresh_disagreements()
        self.status.setText(f"{root.name}: {project.task}, {len(patches)} patches, {len(project.models)} models")
        self._enable()
        return True

    def rater(self) -> str | None:
        """The rater name typed (checked), or None when none is."""
        text = self.rater_edit.text().strip()
        return layout.check_name("rater", text) if text else None

    def set_rater(self, name: str) -> None:
        self.rater_edit.setText(name)
        self._rater_edited()

    def _rater_edited(self) -> None:
        if self.root is None:
            return
        try:
            self.rater()
        except ReviewError as exc:
            self.status.setText(str(exc))
            return
        self._load_ratings()
        if not self.correcting:
            self.show_patch(self.first_unfinished())
        self.refresh_disagreements()

    def _valid_rater(self) -> str | None:
        """The rater name when one is typed and valid (the status line says why a name is refused)."""
        try:
            return self.rater()
        except ReviewError:
            return None

    def _load_ratings(self) -> None:
        """The current rater's own ratings, never another's (blinding)."""
        rater = self._valid_rater()
        self.ratings = layout.read_ratings(self.root, rater) if rater and self.root else {}

    def _fill_models(self) -> None:
        names = self.project.model_names
        for combo in (self.focus_combo, self.tune_combo):
            refill(combo, names)

    def models(self) -> list[str]:
        return self.project.model_names if self.project else []

    # -- where the rater is ----------------------------------------------------
    def patch(self) -> str | None:
        return self.patches[self.index] if self.patches else None

    def focused(self) -> str:
        return self.focus_combo.currentText()

    def finished(self, patch: str) -> bool:
        return all((patch, m) in self.ratings for m in self.models())

    def rated_count(self) -> tuple[int, int]:
        """(patches the current rater rated for every model, patches)."""
        return sum(self.finished(p) for p in self.patches), len(self.patches)

    def first_unfinished(self, start: int = 0) -> int:
        """The first patch from `start` on (wrapping) not rated for every model; `start` when all are."""
        n = len(self.patches)
        for k in range(n):
            i = (start + k) % n
            if not self.finished(self.patches[i]):
                return i
        return start if n else 0

    def show_patch(self, index: int) -> None:
        """Show patch `index`: its image, each model's outlines, counts and agreement, the rater's own ratings."""
        if not self.patches:
            return
        moved = index != self.index or self._ours(IMAGE) is None
        self.index = max(0, min(index, len(self.patches) - 1))
        patch = self.patch()
        from PIL import Image

        with Image.open(layout.patch_png(self.root, patch)) as image:
            rgb = np.asarray(image.convert("RGB"))
        self._image_layer(rgb)
        for model in self.models():
            path = layout.prediction_tif(self.root, model, patch)
            labels = layout.read_labels(path) if path.is_file() else np.zeros(rgb.shape[:2], np.uint32)
            self._labels_layer(model, labels)
        self.stats_text = self._measure(patch)
        unrated = [m for m in self.models() if (patch, m) not in self.ratings]
        if unrated and (moved or self.focused() not in unrated):  # a new patch starts at its first unrated model
            self.focus_combo.setCurrentText(unrated[0])
        self._show_layers()  # and the description

    def next_patch(self) -> None:
        if not self.correcting and self.patches:
            self.show_patch(min(self.index + 1, len(self.patches) - 1))

    def previous_patch(self) -> None:
        if not self.correcting and self.patches:
            self.show_patch(max(self.index - 1, 0))

    def move_focus(self, step: int) -> None:
        count = self.focus_combo.count()
        if count:
            self.focus_combo.setCurrentIndex((self.focus_combo.currentIndex() + step) % count)

    def _image_layer(self, rgb: np.ndarray):
        layer = self._ours(IMAGE)
        if layer is None:
            layer = self.viewer.add_image(rgb, name=IMAGE, rgb=True, metadata={"review": True})
            self.bind_keys(layer)
        else:
            layer.data = rgb
        return layer

    def _labels_layer(self, model: str, labels: np.ndarray):
        layer = self._ours(model)
        if layer is None:
            layer = self.viewer.add_labels(labels, name=model, opacity=0.9, metadata={"review": True})
            layer.contour = 1  # outlines: the nuclei underneath stay visible
            self.bind_keys(layer)
        else:
            layer.data = labels
        return layer

    def _ours(self, name: str):
        return next((la for la in self.viewer.layers if la.name == name and la.metadata.get("review")), None)

    def _show_layers(self) -> None:
        focus, every = self.focused(), self.all_check.isChecked() and not self.correcting
        for model in self.models():
            layer = self._ours(model)
            if layer is not None:
                layer.visible = not self.correcting and (every or model == focus)
        image = self._ours(IMAGE)
        if image is not None and not self.correcting:
            self.viewer.layers.selection.active = image  # its keys are ours; a Labels layer's would paint
        self._describe()

    def _describe(self) -> None:
        patch = self.patch()
        if patch is None:
            return
        rated, total = self.rated_count()
        self.counter_label.setText(f"{rated} / {total} rated")
        self.patch_label.setText(f"{patch} ({self.index + 1} of {total})")
        focus = self.focused()
        self.rated_label.setText(
            "; ".join(f"{'▶ ' if m == focus else ''}{m}: {self.ratings.get((patch, m), '—')}" for m in self.models())
        )
        self.stats_label.setText(self.stats_text)

    def _measure(self, patch: str) -> str:
        """Objects per model and their pairwise IoU-matched F1 on `patch`: shown to help, never to decide."""
        from ...review.stats import patch_stats

        try:
            stats = patch_stats(self.root, patch, self.models())
        except ReviewError as exc:
            return str(exc)
        objects = ", ".join(f"{m} {n}" for m, n in stats.objects.items())
        names = list(stats.objects)
        pairs = [f"{a}–{b} {stats.agreement[(a, b)]:.2f}" for i, a in enumerate(names) for b in names[i + 1 :]]
        return f"objects: {objects}" + (f"; agreement F1: {', '.join(pairs)}" if pairs else "")

    # -- rating ----------------------------------------------------------------
    def rate(self, rating: str) -> bool:
        """Save the current rater's `rating` of the model in focus on this patch at once, then move the focus on."""
        from ...review.consensus import adjudicate

        if self.root is None:
            self.status.setText("open a review project first")
            return False
        if self.correcting:
            self.status.setText("correcting: save or skip this patch, or go back to rating")
            return False
        try:
            rater = self.rater()
            if rater is None:
                raise ReviewError("type your rater name first: ratings are saved per rater")
            patch, model = self.patch(), self.focused()
            if rater == ADJUDICATOR:
                adjudicate(self.root, patch, model, rating)
            else:
                layout.append_rating(self.root, rater, patch, model, rating)
        except ERRORS as exc:
            self.status.setText(str(exc))
            return False
        was_finished = self.finished(patch)
        self.ratings[(patch, model)] = rating
        self.status.setText(f"{patch}: {model} {rating}")
        models = self.models()
        at = models.index(model)
        unrated = [m for m in models[at + 1 :] + models[:at] if (patch, m) not in self.ratings]
        if unrated:
            self.focus_combo.setCurrentText(unrated[0])
        elif not was_finished:  # this rating finished the patch: on to the next unfinished one
            self.show_patch(self.first_unfinished(self.index + 1))
        if rater == ADJUDICATOR:
            self.refresh_disagreements()
        self._describe()
        return True

    # -- disagreements ---------------------------------------------------------
    def refresh_disagreements(self) -> None:
        """List what the raters disagree on; only for the adjudicator, the others stay blind to each other."""
        from ...review.consensus import disagreements

        self.disagreements_list.blockSignals(True)
        self.disagreements_list.clear()
        self.disagreements_list.blockSignals(False)
        if self.root is None or self._valid_rater() != ADJUDICATOR:
            self.disagreements_label.setText(
                f"Rater {ADJUDICATOR!r} sees what the raters disagree on and settles it with the keys."
            )
            self.disagreements_list.setEnabled(False)
            return
        found = disagreements(self.root)
        self.disagreements_list.setEnabled(True)
        for d in found:
            text = f"{d.patch} · {d.model}: " + ", ".join(f"{r} {v}" for r, v in d.ratings.items())
            item = QListWidgetItem(text)
            item.setData(Qt.ItemDataRole.UserRole, (d.patch, d.model))
            self.disagreements_list.addItem(item)
        self.disagreements_label.setText(
            f"{len(found)} disagreement(s): pick one, then 1 / 2 / 3 settle it" if found else "No disagreement left."
        )

    def show_disagreement(self, row: int) -> None:
        item = self.disagreements_list.item(row)
        if item is None or self.correcting:
            return
        patch, model = item.data(Qt.ItemDataRole.UserRole)
        self.show_patch(self.patches.index(patch))
        self.focus_combo.setCurrentText(model)

    # -- results ---------------------------------------------------------------
    def show_results(self) -> list[Path]:
        """Write the fusion tables and figures (PROJECT/results) and show the figures and the summary."""
        from ...review.figures import write_results
        from ...review.fusion import fusion_report

        if self.root is None:
            self.status.setText("open a review project first")
            return []
        try:
            report = fusion_report(self.root)
            paths = write_results(self.root, report)
            summary = report.summary()
        except (*ERRORS, ImportError) as exc:
            self.status.setText(str(exc))
            return []
        self.results_label.setText(summary)
        figures = [p for p in paths if p.suffix == ".png"]
        if self.results_dialog is not None:
            self.results_dialog.close()
        dialog = QDialog(self)
        dialog.setWindowTitle(f"Review results: {self.root.name}")
        column = QVBoxLayout(dialog)
        for path in figures:
            label = QLabel()
            label.setPixmap(QPixmap(str(path)))
            label.setToolTip(str(path))
            column.addWidget(label)
        column.addWidget(QLabel(summary))
        self.results_dialog = dialog
        dialog.show()
        self.status.setText(f"results written to {layout.results_dir(self.root)}")
        return paths

    # -- corrections -----------------------------------------------------------
    def start_correction(self) -> None:
        """Walk the fused-bad patches not corrected yet, each starting from its best prediction."""
        from ...review.consensus import effective_ratings
        from ...review.sets import corrected, hard_patches

        if self.root is None:
            self.status.setText("open a review project first")
            return
        try:
            if self.rater() is None:
                raise ReviewError("type your rater name first: corrections record who made them")
            done = corrected(self.root)
            hard = hard_patches(self.root, effective_ratings(self.root))
        except ERRORS as exc:
            self.status.setText(str(exc))
            return
        left = [p for p in hard if p not in done]
        if not left:
            self.correction_label.setText(
                f"No fused-bad patch waits for a correction ({len(hard)} hard, all corrected)."
            )
            return
        self.correcting = left
        self._open_correction()

    def _open_correction(self) -> None:
        from ...review.consensus import effective_ratings
        from ...review.sets import starting_point

        if not self.correcting:
            self.stop_correction()
            self.correction_label.setText("Every fused-bad patch is corrected.")
            return
        patch = self.correcting[0]
        self.show_patch(self.patches.index(patch))
        try:
            model = starting_point(self.root, patch, effective_ratings(self.root))
        except ERRORS as exc:
            self.status.setText(str(exc))
            return
        self.started_from = model
        labels = layout.read_labels(layout.prediction_tif(self.root, model, patch))
        layer = self._ours(CORRECTION)
        if layer is None:
            layer = self.viewer.add_labels(labels, name=CORRECTION, metadata={"review": True})
        else:
            layer.data = labels
        layer.visible = True
        self.viewer.layers.selection.active = layer
        layer.mode = "paint"
        layer.selected_label = int(labels.max()) + 1  # a new object: painting never merges into another
        self._show_layers()
        self._enable()
        self.correction_label.setText(
            f"{patch}: starting from {model}; paint and erase in layer {CORRECTION!r}, then Save. "
            f"{len(self.correcting)} left."
        )

    def save_correction(self) -> Path | None:
        """Save the correction layer as the patch's hard label (`sets.save_correction`), then the next hard patch."""
        from ...review.sets import save_correction

        layer = self._ours(CORRECTION)
        if not self.correcting or layer is None:
            self.status.setText("start correcting the hard patches first")
            return None
        patch = self.correcting[0]
        try:
            path = save_correction(
                self.root,
                patch,
                np.asarray(layer.data),
                rater=self.rater(),
                started_from=self.started_from,
                classes=self._classes(patch),
            )
        except ERRORS as exc:
            self.status.setText(str(exc))
            return None
        self.status.setText(f"{patch}: correction saved ({path.name})")
        self.next_hard()
        return path

    def _classes(self, patch: str) -> dict[int, str] | None:
        return layout.read_classes(layout.prediction_classes(self.root, self.started_from, patch)) or None

    def next_hard(self) -> None:
        if self.correcting:
            self.correcting.pop(0)
            self._open_correction()

    def stop_correction(self) -> None:
        self.correcting = None
        layer = self._ours(CORRECTION)
        if layer is not None:
            self.viewer.layers.remove(layer)
        self._show_layers()
        self._enable()

    # -- fine-tuning -----------------------------------------------------------
    def finetune_options(self) -> dict:
        """The recipe as chosen: 0 ("default") leaves a setting to the family's default."""
        given = {
            "epochs": self.epochs_spin.value(),
            "steps_per_epoch": self.steps_spin.value(),
            "batch_size": self.batch_spin.value(),
            "crop": self.crop_spin.value(),
        }
        return {k: v for k, v in given.items() if v} | {"device": self.device_combo.currentText()}

    def round_folder(self, model: str) -> tuple[Path, str]:
        """PROJECT/finetune/<model>-ftK (the first free K) and the new model's name, <model>-ftK."""
        k = 1
        while (self.root / "finetune" / f"{model}-ft{k}").exists() or f"{model}-ft{k}" in self.models():
            k += 1
        return self.root / "finetune" / f"{model}-ft{k}", f"{model}-ft{k}"

    def start_finetune(self) -> None:
        """Export the easy + hard pairs, fine-tune the chosen model on them and add it to the project, in a worker."""
        from napari.qt.threading import create_worker

        from ...pipelines.review import add_model
        from ...review.export import export_tiles
        from ...review.finetune import family_of, finetune

        if self.root is None or not self.tune_combo.currentText():
            self.status.setText("open a review project first")
            return
        root, spec = self.root, self.project.model(self.tune_combo.currentText()).spec
        folder, name = self.round_folder(self.tune_combo.currentText())
        options = self.finetune_options()
        stop, emit = self._stop.is_set, self.progressed.emit

        def job():
            family = family_of(spec)
            folder.mkdir(parents=True)
            try:  # a round that ends before its model is made leaves no folder behind (nor takes its name)
                dataset = export_tiles(
                    root, folder / "set", progress=lambda d, t: emit("export", d, t), on_note=lambda n: emit(n, 0, 0)
                )
                out = folder / ("model.pth" if family == "cellvit" else "model")
                progress = lambda d, t: emit("fine-tune", d, t)  # noqa: E731
                made = finetune(dataset, spec, out, progress=progress, stop=stop, **options)
                if made is None or stop():
                    shutil.rmtree(folder)
                    return None
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            progress = lambda d, t, text="": emit("predict", d, t)  # noqa: E731
            return add_model(root, str(made), name, device=options["device"], progress=progress, cancel=stop)

        self._stop.clear()
        self.result = None
        self._worker = create_worker(catching(job, ERRORS))
        self._worker.returned.connect(self._tuned)
        self._worker.errored.connect(lambda exc: self.tune_label.setText(f"Failed: {type(exc).__name__}: {exc}"))
        self._worker.finished.connect(self._tune_idle)
        self.tune_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.tune_label.setText(f"Exporting the easy + hard pairs to {folder}…")
        self._worker.start()

    def cancel_finetune(self) -> None:
        self._stop.set()
        self.tune_label.setText("Stopping after the current step…")

    def _show_progress(self, stage: str, done: int, total: int) -> None:
        if not total:  # a note from the export
            self.tune_label.setText(stage)
            return
        self.progress.setMaximum(total)
        self.progress.setValue(done)
        if not self._stop.is_set():
            self.tune_label.setText(f"{stage}: {done} / {total}")

    def _tuned(self, outcome) -> None:
        self.result = outcome
        if isinstance(outcome, UserFailure):
            self.tune_label.setText(outcome)
            return
        if outcome is None:
            self.tune_label.setText("Stopped: nothing was added to the project.")
            return
        self.project = layout.read_project(self.root)
        self._fill_models()
        self.show_patch(self.first_unfinished())
        if self._all_predicted(outcome.name):
            self.tune_label.setText(f"Added {outcome.name}, predicted on every patch: rate it in this second round.")
        else:
            self.tune_label.setText(
                f"Added {outcome.name}; finish its predictions with nephro review predict {self.root}"
            )

    def _all_predicted(self, model: str) -> bool:
        return all(layout.prediction_tif(self.root, model, p).is_file() for p in self.patches)

    def _tune_idle(self) -> None:
        self.tune_button.setEnabled(self.root is not None)
        self.cancel_button.setEnabled(False)

    def _enable(self) -> None:
        opened, correcting = self.root is not None, bool(self.correcting)
        for widget in (*self.rate_buttons.values(), self.prev_button, self.next_button, self.focus_combo):
            widget.setEnabled(opened and not correcting)
        for widget in (self.save_button, self.skip_button, self.done_button):
            widget.setEnabled(correcting)
        self.correct_button.setEnabled(opened and not correcting)
        self.results_button.setEnabled(opened)
        self.tune_button.setEnabled(opened and not self.cancel_button.isEnabled())


def _row(*widgets) -> QHBoxLayout:
    row = QHBoxLayout()
    for widget in widgets:
        row.addWidget(widget)
    return row


def _int_spin(lo: int, hi: int, value: int, special: str | None = None) -> QSpinBox:
    spin = QSpinBox(minimum=lo, maximum=hi)
    spin.setValue(value)
    if special:
        spin.setSpecialValueText(special)
    return spin


__all__ = ["ReviewWidget"]
