""" "Slide info" dock widget: what the file says, its levels, associated images, and the pixel size."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ...io import Slide, SlideError
from ..layers import slide_layer_kwargs
from ._layers import chosen, refill, slide_layers

if TYPE_CHECKING:
    import napari

LEVEL_COLUMNS = ("level", "width", "height", "downsample", "tile", "um/px")


class SlideInfoWidget(QWidget):
    """Shows the slide behind the chosen image layer and lets the user set its pixel size."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.layer_combo = QComboBox()
        self.fields = {key: QLabel("-") for key in ("file", "format", "pixel size", "objective", "size")}
        for label in self.fields.values():
            label.setWordWrap(True)
        self.levels_table = QTableWidget(0, len(LEVEL_COLUMNS))
        self.levels_table.setHorizontalHeaderLabels(LEVEL_COLUMNS)
        self.levels_table.verticalHeader().setVisible(False)
        self.levels_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.associated_list = QListWidget()
        self.open_associated_button = QPushButton("Open as layer")
        self.mpp_spin = QDoubleSpinBox(decimals=4, minimum=0.01, maximum=100.0, singleStep=0.01, suffix=" um/px")
        self.mpp_spin.setValue(0.25)
        self.set_mpp_button = QPushButton("Set pixel size")
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Layer", self.layer_combo)
        for key, label in self.fields.items():
            form.addRow(key.capitalize(), label)
        mpp_row = QHBoxLayout()
        mpp_row.addWidget(self.mpp_spin)
        mpp_row.addWidget(self.set_mpp_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(QLabel("Pyramid levels"))
        layout.addWidget(self.levels_table)
        layout.addWidget(QLabel("Associated images"))
        layout.addWidget(self.associated_list)
        layout.addWidget(self.open_associated_button)
        layout.addWidget(QLabel("Level-0 pixel size (set it when the file does not say)"))
        layout.addLayout(mpp_row)
        layout.addWidget(self.status)

        self.layer_combo.currentIndexChanged.connect(self._show_current)
        self.set_mpp_button.clicked.connect(self._apply_mpp)
        self.open_associated_button.clicked.connect(self._open_associated)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # -- which layer --------------------------------------------------------
    def slide_layers(self) -> list[napari.layers.Image]:
        return slide_layers(self.viewer)

    def current_layer(self) -> napari.layers.Image | None:
        return chosen(self.layer_combo, self.slide_layers())

    def current_slide(self) -> Slide | None:
        layer = self.current_layer()
        return None if layer is None else layer.metadata["slide"]

    def _refresh_layers(self, *_: object) -> None:
        refill(self.layer_combo, [layer.name for layer in self.slide_layers()])
        self._show_current()

    # -- showing ------------------------------------------------------------
    def _show_current(self, *_: object) -> None:
        slide = self.current_slide()
        self.levels_table.setRowCount(0)
        self.associated_list.clear()
        if slide is None:
            for label in self.fields.values():
                label.setText("-")
            self.status.setText("Open a slide (File > Open) to see its details.")
            return
        h, w = slide.level_shapes[0]
        self.fields["file"].setText(str(slide.source))
        self.fields["format"].setText(f"{slide.vendor or 'unknown'} (read with {slide.backend})")
        if slide.mpp is None:
            self.fields["pixel size"].setText("unknown: set it below")
        else:
            self.fields["pixel size"].setText(f"{slide.mpp:.4f} um/px (from the {slide.mpp_source})")
            self.mpp_spin.setValue(slide.mpp)
        power = slide.objective_power
        self.fields["objective"].setText(f"{power:g}x" if power else "unknown")
        size = f"{w} x {h} px"
        if slide.mpp:
            size += f" = {w * slide.mpp_yx[1] / 1000:.2f} x {h * slide.mpp_yx[0] / 1000:.2f} mm"
        self.fields["size"].setText(size)
        for info in map(slide.level_info, range(slide.level_count)):
            row = self.levels_table.rowCount()
            self.levels_table.insertRow(row)
            mpp = "-" if info.mpp is None else f"{(info.mpp[0] + info.mpp[1]) / 2:.4f}"
            cells = (
                info.index,
                info.shape[1],
                info.shape[0],
                f"{info.downsample:.3f}",
                f"{info.tile[1]}x{info.tile[0]}",
                mpp,
            )
            for col, value in enumerate(cells):
                self.levels_table.setItem(row, col, QTableWidgetItem(str(value)))
        self.associated_list.addItems(slide.associated_images)
        self.status.setText("")

    # -- actions ------------------------------------------------------------
    def _apply_mpp(self) -> None:
        layer, slide = self.current_layer(), self.current_slide()
        if layer is None or slide is None:
            self.status.setText("No slide layer chosen.")
            return
        try:
            slide.set_mpp(self.mpp_spin.value())
        except SlideError as exc:
            self.status.setText(str(exc))
            return
        kwargs = slide_layer_kwargs(slide)
        layer.scale = kwargs["scale"]
        layer.units = kwargs["units"]
        self.viewer.reset_view()
        self._show_current()
        self.status.setText(f"Pixel size set to {slide.mpp:.4f} um/px; the layer is now in micrometres.")

    def _open_associated(self) -> None:
        slide, item = self.current_slide(), self.associated_list.currentItem()
        if slide is None or item is None:
            self.status.setText("Choose an associated image in the list first.")
            return
        name = item.text()
        try:
            pixels = slide.associated_image(name)
        except SlideError as exc:
            self.status.setText(str(exc))
            return
        self.viewer.add_image(pixels, rgb=True, name=f"{slide.source.name} [{name}]")
