""" "Prompts" dock widget: paint a few examples per class, review them, save the set, segment with SegGPT.

Painting happens on a Labels layer over the slide (one label value per class);
"Add painted objects" cuts one example around each painted object, at the prompt
set's scale. The gallery shows each crop with its mask for review. Segmenting
reuses the Segment widget's run (field of view, rectangle or whole slide; progress,
cancel, resume) with SegGPT and the current prompt set, after saying what it costs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QSize, Qt
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
)

from ...annotations.colors import class_color
from ...inference import SegmentError
from ...prompts import PromptError
from ..layer_annotations import label_classes
from ._layers import chosen, labels_layers, refill
from .segment import ERRORS, WHERE, SegmentWidget, aligned

if TYPE_CHECKING:
    import napari

DEFAULT_CLASSES = "normal, segmental sclerosis, global sclerosis"
PAINT_PIXELS = 64 * 2**20  # a painting layer larger than this is made coarser than the prompt set's mpp
THUMBNAIL = 96


class PromptsWidget(SegmentWidget):
    errors = (*ERRORS, PromptError)

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        from ...prompts import PromptSet

        self.prompts = PromptSet()
        self._confirmed: tuple | None = None
        self._weights: tuple | None = None  # (source, device), model, processor, fingerprint
        self._folder: Path | None = None  # the prompt set folder last loaded or saved here
        self._confirmed_save: Path | None = None
        self.classes_edit = QLineEdit(DEFAULT_CLASSES)
        self.classes_edit.setToolTip("class names, comma-separated: label value 1 is the first, 2 the second…")
        self.legend = QLabel("")
        self.legend.setWordWrap(True)
        self.mpp_spin = QDoubleSpinBox(decimals=4, minimum=0.01, maximum=1000.0, singleStep=0.25, value=1.0)
        self.mpp_spin.setSuffix(" um/px")
        self.size_spin = QSpinBox(minimum=16, maximum=4096, value=448)
        self.paint_combo = QComboBox()
        self.new_layer_button = QPushButton("New prompt layer")
        self.add_button = QPushButton("Add painted objects")
        self.gallery = QListWidget()
        self.gallery.setViewMode(QListView.ViewMode.IconMode)
        self.gallery.setIconSize(QSize(THUMBNAIL, THUMBNAIL))
        self.gallery.setResizeMode(QListView.ResizeMode.Adjust)
        self.gallery.setSelectionMode(QListWidget.SelectionMode.ExtendedSelection)
        self.gallery.setMinimumHeight(THUMBNAIL + 40)
        self.remove_button = QPushButton("Remove selected")
        self.relabel_combo = QComboBox()
        self.relabel_button = QPushButton("Relabel selected as")
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("prompt set folder (PNG pairs + prompts.json)")
        self.folder_button = QPushButton("…")
        self.folder_button.setToolTip("choose the prompt set folder")
        self.save_button = QPushButton("Save")
        self.load_button = QPushButton("Load")
        self.prompt_status = QLabel("")
        self.prompt_status.setWordWrap(True)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(["per_class", "palette"])
        self.mode_combo.setToolTip(
            "per_class: one SegGPT run per class (as in the paper); palette: one run, a colour each"
        )
        self.cost = QLabel("")
        self.cost.setWordWrap(True)
        super().__init__(napari_viewer)

        self.model_edit.setText("BAAI/seggpt-vit-large")
        self.model_edit.setPlaceholderText("SegGPT weights: a downloaded folder, or a Hugging Face id")
        self.batch_spin.setToolTip("tiles per call, at least: SegGPT fills passes of 16 tile x prompt pairs on a GPU")
        self.form.addRow("SegGPT mode", self.mode_combo)
        self.form.addRow("", self.cost)
        box = QGroupBox("Prompts")
        form = QFormLayout(box)
        form.addRow("Classes", self.classes_edit)
        form.addRow("", self.legend)
        crop = QHBoxLayout()
        crop.addWidget(self.size_spin)
        crop.addWidget(QLabel("px at"))
        crop.addWidget(self.mpp_spin)
        form.addRow("Crops", crop)
        paint = QHBoxLayout()
        paint.addWidget(self.paint_combo)
        paint.addWidget(self.new_layer_button)
        form.addRow("Paint on", paint)
        form.addRow("", self.add_button)
        form.addRow(self.gallery)
        edit = QHBoxLayout()
        edit.addWidget(self.remove_button)
        edit.addWidget(self.relabel_button)
        edit.addWidget(self.relabel_combo)
        form.addRow(edit)
        files = QHBoxLayout()
        files.addWidget(self.folder_edit)
        files.addWidget(self.folder_button)
        files.addWidget(self.save_button)
        files.addWidget(self.load_button)
        form.addRow("Prompt set", files)
        form.addRow("", self.prompt_status)
        self.layout().insertWidget(0, box)

        self.classes_edit.editingFinished.connect(self._classes_changed)
        self.new_layer_button.clicked.connect(self.new_prompt_layer)
        self.add_button.clicked.connect(self.add_painted)
        self.gallery.itemDoubleClicked.connect(self.go_to)
        self.remove_button.clicked.connect(self.remove_selected)
        self.relabel_button.clicked.connect(self.relabel_selected)
        self.folder_button.clicked.connect(self._choose_folder)
        self.save_button.clicked.connect(self.save)
        self.load_button.clicked.connect(self.load)
        self.where_combo.currentTextChanged.connect(lambda _: self.cost.setText(""))
        self._classes_changed()

    # -- choices ----------------------------------------------------------------------
    def _refresh(self, *_: object) -> None:
        super()._refresh()
        if hasattr(self, "paint_combo"):
            refill(self.paint_combo, [layer.name for layer in labels_layers(self.viewer, exclude=self.result_layer)])

    def paint_layer(self):
        return chosen(self.paint_combo, labels_layers(self.viewer))

    def classes(self) -> list[str]:
        return [c.strip() for c in self.classes_edit.text().split(",") if c.strip()]

    def _classes_changed(self) -> None:
        """The class list is the prompt set's: renaming keeps the examples, removing a used class is refused."""
        names = self.classes()
        try:
            if len(set(names)) != len(names) or not names:
                raise PromptError("class names must be distinct, at least one")
            lost = self.prompts.classes[len(names) :]
            used = [
                c
                for i, c in enumerate(lost, start=len(names) + 1)
                if any((e.mask == i).any() for e in self.prompts.examples)
            ]
            if used:
                raise PromptError(
                    f"examples show {', '.join(used)} (as their object or a neighbour): remove them before the class"
                )
            for i, name in enumerate(names[: len(self.prompts.classes)]):
                if self.prompts.classes[i] != name:
                    self.prompts.rename_class(self.prompts.classes[i], name)
            self.prompts.classes = self.prompts.classes[: len(names)] + names[len(self.prompts.classes) :]
        except PromptError as exc:
            self.prompt_status.setText(str(exc))
            self.classes_edit.setText(", ".join(self.prompts.classes))
            return
        self.legend.setText("paint with label " + ", ".join(f"{i} = {c}" for i, c in enumerate(names, start=1)))
        refill(self.relabel_combo, names)
        layer = self.paint_layer()
        if layer is not None and layer.metadata.get("prompt_layer"):
            _colour(layer, self.prompts.classes)
        self._show_set()

    def _describe_model(self) -> None:
        """Where the weights will come from, and the scale SegGPT will see the slide at."""
        from ...models.seggpt import weights_source

        source = self.model_edit.text().strip()
        where = weights_source(source)
        if where == "folder":
            weights = f"weights from {Path(source).expanduser().name}"
        elif where == "hub":
            weights = f"weights {source} from the Hugging Face cache (downloaded if online)"
        else:
            weights = f"no SegGPT folder at {source!r}: see docs/seggpt.md for the download"
        self.model_info.setText(
            f"SegGPT, {weights}; it sees {self.prompts.size} px tiles at {self.prompts.mpp:g} um/px, as the crops"
        )

    # -- painting ---------------------------------------------------------------------
    def new_prompt_layer(self):
        """A Labels layer over the slide to paint examples on, at the prompt set's scale (coarser on huge slides)."""
        layer = self.slide_layer()
        if layer is None:
            self.prompt_status.setText("Open a slide first.")
            return None
        slide = layer.metadata["slide"]
        if slide.mpp is None:
            self.prompt_status.setText(f"{slide.source.name}: its pixel size is unknown; set it in Slide info first")
            return None
        height, width = slide.level_shapes[0]
        downsample = max(self.mpp_spin.value() / slide.mpp, math.sqrt(height * width / PAINT_PIXELS), 1.0)
        shape = (math.ceil(height / downsample), math.ceil(width / downsample))
        scale, translate = aligned(layer, (0, 0), downsample)
        paint = self.viewer.add_labels(
            np.zeros(shape, np.uint8),
            name=f"prompts on {layer.name}",
            scale=scale,
            translate=translate,
            units=tuple(str(u) for u in layer.units),
            metadata={"prompt_layer": True},
        )
        _colour(paint, self.prompts.classes)
        paint.selected_label = 1
        paint.mode = "paint"
        self.paint_combo.setCurrentText(paint.name)
        self.prompt_status.setText(f"Paint objects with label {self.legend.text().removeprefix('paint with label ')}.")
        return paint

    def add_painted(self) -> None:
        """Cut an example around every painted object not yet in the set.

        Label values are the classes in order, or what the layer itself says (a
        segmentation result or a label file names its classes): any such layer
        can serve as the painting.
        """
        from ...prompts import examples_from_labels

        slide_layer, paint = self.slide_layer(), self.paint_layer()
        try:
            if slide_layer is None:
                raise PromptError("open a slide first")
            if paint is None:
                raise PromptError("paint on a Labels layer first (New prompt layer)")
            self._set_scale()
            downsample, origin = _placement(paint, slide_layer)
            values = label_classes({"metadata": paint.metadata, "features": paint.features}) or None
            examples, skipped = examples_from_labels(
                slide_layer.metadata["slide"],
                _plane(paint),
                self.prompts,
                downsample=downsample,
                origin=origin,
                values=values,
            )
        except PromptError as exc:
            self.prompt_status.setText(str(exc))
            return
        added = [e for e in examples if self.prompts.add(e) is not None]
        self._show_set()
        notes = f" {len(skipped)} left out: {skipped[0]}" if skipped else ""
        self.prompt_status.setText(f"{len(added)} examples added. {self.prompts.describe()}.{notes}")

    def _set_scale(self) -> None:
        """The crop scale is the set's; it can change only while the set is empty."""
        mpp, size = self.mpp_spin.value(), self.size_spin.value()
        if abs(mpp - self.prompts.mpp) < 0.5e-4 and size == self.prompts.size:  # the box shows 4 decimals
            return
        if len(self.prompts):
            self.mpp_spin.setValue(self.prompts.mpp)
            self.size_spin.setValue(self.prompts.size)
            raise PromptError(
                f"the set's examples are {self.prompts.size} px at {self.prompts.mpp:g} um/px; all must be alike: "
                "remove them to change the crops"
            )
        self.prompts.mpp, self.prompts.size = mpp, size
        self._describe_model()

    # -- the set ------------------------------------------------------------------------
    def _show_set(self) -> None:
        self.gallery.clear()
        for e in self.prompts.examples:
            item = QListWidgetItem(QIcon(QPixmap.fromImage(_thumbnail(e, self.prompts.classes))), f"{e.id} {e.label}")
            item.setData(Qt.ItemDataRole.UserRole, e.id)
            item.setToolTip(f"{e.label} from {e.source} at x={e.location[0]:.0f}, y={e.location[1]:.0f}")
            self.gallery.addItem(item)
        self.mpp_spin.setEnabled(not len(self.prompts))
        self.size_spin.setEnabled(not len(self.prompts))
        self.cost.setText("")

    def go_to(self, item) -> None:
        """Centre the view on a double-clicked example, when it comes from the slide on screen."""
        example = self.prompts.get(item.data(Qt.ItemDataRole.UserRole))
        layer = self.slide_layer()
        if layer is None or layer.metadata["slide"].source.name != example.source:
            self.prompt_status.setText(f"{example.id} comes from {example.source}, not the slide shown.")
            return
        x, y, w, h = example.location
        centre = layer.data_to_world((y + h / 2 - 0.5, x + w / 2 - 0.5))  # level-0 pixel indices of the centre
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera  # napari >= 0.9
        camera.center = tuple(centre[-2:])

    def selected_ids(self) -> list[str]:
        return [item.data(Qt.ItemDataRole.UserRole) for item in self.gallery.selectedItems()]

    def remove_selected(self) -> None:
        ids = self.selected_ids()
        if ids:
            self.prompts.remove(*ids)
            self._show_set()
            self.prompt_status.setText(f"Removed {', '.join(ids)}. {self.prompts.describe()}.")

    def relabel_selected(self) -> None:
        label = self.relabel_combo.currentText()
        for example_id in self.selected_ids():
            self.prompts.relabel(example_id, label)
        self._show_set()
        self.prompt_status.setText(self.prompts.describe())

    def _choose_folder(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        folder = QFileDialog.getExistingDirectory(self, "Prompt set folder")
        if folder:
            self.folder_edit.setText(folder)

    def save(self) -> None:
        """Save to the folder; replacing a prompt set other than the one loaded or saved here takes a second press."""
        from ...prompts.promptset import INDEX

        folder = self.folder_edit.text().strip()
        try:
            if not folder:
                raise PromptError("type the folder to save the prompt set in")
            target = Path(folder).expanduser().resolve()
            if (target / INDEX).is_file() and target not in (self._folder, self._confirmed_save):
                self._confirmed_save = target
                raise PromptError(f"{folder} holds another prompt set: press Save again to replace it")
            self.prompts.save(target, overwrite=True)
        except (PromptError, OSError) as exc:
            self.prompt_status.setText(str(exc))
            return
        self._folder, self._confirmed_save = target, None
        self.prompt_status.setText(f"Saved to {folder}: {self.prompts.describe()}.")

    def load(self) -> None:
        from ...prompts import PromptSet

        folder = self.folder_edit.text().strip()
        try:
            if not folder:
                raise PromptError("type the folder of a prompt set to load")
            self.prompts = PromptSet.load(folder)
            self._folder = Path(folder).expanduser().resolve()
        except (PromptError, OSError) as exc:
            self.prompt_status.setText(str(exc))
            return
        self.classes_edit.setText(", ".join(self.prompts.classes))
        self.mpp_spin.setValue(self.prompts.mpp)
        self.size_spin.setValue(self.prompts.size)
        self._classes_changed()
        self._describe_model()
        self.prompt_status.setText(f"Loaded {folder}: {self.prompts.describe()}.")

    # -- segmenting -----------------------------------------------------------------
    def segmenter(self):
        """SegGPT with the current prompts. The weights (1.5 GB) are read once per folder and device;
        the prompts are encoded anew each run, so adding an example costs no reload."""
        from ...models import pick_device
        from ...models.seggpt import SegGptSegmenter, load_seggpt, seggpt_fingerprint

        self.prompts.check_usable()
        source = self.model_edit.text().strip() or None
        device = pick_device(self.device_combo.currentText())
        key = (source, str(device))
        if self._weights is None or self._weights[0] != key:
            self._weights = (key, *load_seggpt(source), seggpt_fingerprint(source))
        _, model, processor, fingerprint = self._weights
        self._segmenter = SegGptSegmenter(
            model,
            processor,
            self.prompts,
            mode=self.mode_combo.currentText(),
            device=device,
            fingerprint=fingerprint,
        )
        return self._segmenter

    def batch_size(self) -> int:
        """Tiles per call: enough to fill SegGPT's passes of tile x prompt pairs on this device."""
        from ...models import pick_device
        from ...models.seggpt import PAIRS_PER_BATCH, prompts_per_run, tiles_per_call

        pairs = PAIRS_PER_BATCH.get(pick_device(self.device_combo.currentText()).type, 1)
        runs = prompts_per_run(self.prompts, self.mode_combo.currentText())
        return max(self.batch_spin.value(), tiles_per_call(pairs, runs))

    def ready(self, layer) -> bool:
        """Say what the run costs first; a long one starts only when Run is pressed again."""
        from ...models.seggpt import LONG_RUN_SECONDS

        self.prompts.check_usable()
        seconds, text = self.estimate(layer)
        key = (self.where_combo.currentText(), text, self.prompts.fingerprint())
        if seconds > LONG_RUN_SECONDS and self._confirmed != key:
            self._confirmed = key
            self.cost.setText(f"{text}. Press Run again to start anyway.")
            return False
        self._confirmed = None
        self.cost.setText(text)
        return True

    def estimate(self, layer) -> tuple[float, str]:
        """Tissue tiles x prompts, and the time that takes on the chosen device (from benchmark figures)."""
        from ...inference import make_plan
        from ...models import pick_device
        from ...models.seggpt import LONG_RUN_SECONDS, VIT_L_PARAMETERS, run_cost

        slide = layer.metadata["slide"]
        if slide.mpp is None:
            raise SegmentError(f"{slide.source.name}: its pixel size is unknown; set it in Slide info first")
        device = pick_device(self.device_combo.currentText()).type
        size = self.prompts.size
        plan = make_plan(slide, model_mpp=self.prompts.mpp, tile=size, overlap=size // 4, region=self.region(layer))
        parameters = getattr(self._segmenter, "parameters", VIT_L_PARAMETERS)
        seconds, text = run_cost(plan.tissue_tiles, len(self.prompts), device, parameters)
        if device == "cpu" and seconds > LONG_RUN_SECONDS and self.where_combo.currentText() != WHERE[0]:
            text += "; on a CPU, zoom onto a few glomeruli and segment the visible field of view"
        return seconds, text


def _placement(paint, slide_layer) -> tuple[float, tuple[float, float]]:
    """Level-0 pixels per painted pixel, and the level-0 corner (x, y) of painted pixel (0, 0)."""
    s_scale, s_translate = np.asarray(slide_layer.scale[-2:], float), np.asarray(slide_layer.translate[-2:], float)
    p_scale, p_translate = np.asarray(paint.scale[-2:], float), np.asarray(paint.translate[-2:], float)
    ratio = p_scale / s_scale
    if not np.isclose(ratio[0], ratio[1], rtol=1e-3):
        raise PromptError("the painted layer's pixels are not square over the slide")
    centre = (p_translate - s_translate) / s_scale  # painted pixel (0, 0)'s centre, in level-0 pixel indices
    corner = centre - ratio / 2 + 0.5
    return float(ratio[1]), (float(corner[1]), float(corner[0]))


def _plane(paint) -> np.ndarray:
    if paint.multiscale:
        raise PromptError(f"{paint.name} is a multiscale result: paint prompts on a plain layer (New prompt layer)")
    data = np.asarray(paint.data)
    if data.ndim != 2:
        raise PromptError(f"{paint.name} has {data.ndim} dimensions: paint prompts on a 2D layer (New prompt layer)")
    return data


def _colour(layer, classes: list[str]) -> None:
    """Each label value in its class's colour, and its class name in the features napari shows on hover."""
    from napari.utils.colormaps import DirectLabelColormap

    colours = {0: (0, 0, 0, 0), None: (0.5, 0.5, 0.5, 1)}
    for i, name in enumerate(classes, start=1):
        colours[i] = (*(v / 255 for v in class_color(name)), 1.0)
    layer.colormap = DirectLabelColormap(color_dict=colours)
    layer.features = {"index": list(range(len(classes) + 1)), "class": ["background", *classes]}


def _thumbnail(example, classes: list[str]) -> QImage:
    """The crop with its mask in the class colours, half transparent."""
    overlay = example.image.astype(np.float32)
    for i, name in enumerate(classes, start=1):
        where = example.mask == i
        overlay[where] = overlay[where] * 0.55 + np.asarray(class_color(name), np.float32) * 0.45
    rgb = np.ascontiguousarray(overlay.astype(np.uint8))
    h, w, _ = rgb.shape
    image = QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    return image.scaled(THUMBNAIL, THUMBNAIL, Qt.AspectRatioMode.KeepAspectRatio)
