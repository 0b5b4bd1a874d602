""" "Nuclei" dock widget: Cellpose, StarDist or CellViT over the view, a rectangle or the whole slide.

It is the Segment widget with an instance model: the same slide, place, device,
batch, Run / Cancel and progress, plus the family, its weights and its
thresholds. The result is a Labels layer of object ids over the slide (multiscale
for a whole slide) whose features table holds each nucleus's class, score and
area; the status line gives the count and the density in the tissue. A run that
would take long on this machine (a GPU model on a CPU) says so first and starts
only when Run is pressed again.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QFileDialog

from ...inference import SegmentError, partial_path
from ...inference.instance_api import LONG_RUN_SECONDS  # a longer run asks for a second Run
from ._layers import UserFailure, catching
from .segment import REGION_PIXELS, SegmentWidget, slide_downsample

if TYPE_CHECKING:
    import napari


FEATURE_ROWS = 200_000  # nuclei beyond this are not loaded into the layer's features table
FAMILIES = {
    "nuclei": "the shipped model (default), or a folder from nephro train --task nuclei",
    "cellpose": "nuclei (classic, default), cyto3, cpsam (Cellpose-SAM, a GPU model) or a model file",
    "stardist": "2D_versatile_he from StarDist's cache (default), or a model folder",
    "cellvit": "a CellViT checkpoint (.pth), e.g. CellViT-256-x40.pth",
}


class NucleiWidget(SegmentWidget):
    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self.family_combo = QComboBox()
        self.family_combo.addItems(list(FAMILIES))
        self.diameter_spin = _spin(0, 100, 1, 0.0, "7.5 (kidney nuclei)")
        self.flow_spin = _spin(0, 3, 0.05, 0.4)
        self.cellprob_spin = _spin(-6, 6, 0.5, 0.0)
        self.prob_spin = _spin(0, 1, 0.05, 0.0, "0 = thresholds.json")
        self.nms_spin = _spin(0, 1, 0.05, 0.0, "0 = thresholds.json")
        self._confirmed = None
        self._built = False  # the base class describes the model before this widget's rows exist
        super().__init__(napari_viewer)
        self.model_edit.setText("")
        self.form.insertRow(1, "Family", self.family_combo)
        self.form.setRowVisible(self.threshold_spin, False)
        self.form.setRowVisible(self.objects_check, False)
        at = self.form.getWidgetPosition(self.batch_spin)[0] + 1
        for label, spin in (
            ("Diameter (µm)", self.diameter_spin),
            ("Flow threshold", self.flow_spin),
            ("Cell probability", self.cellprob_spin),
            ("Object probability", self.prob_spin),
            ("Overlap (NMS)", self.nms_spin),
        ):
            self.form.insertRow(at, label, spin)
            at += 1
        self.out_edit.setPlaceholderText("whole slide: .zarr, .geojson, .csv (default: OME-Zarr beside the slide)")
        self.family_combo.currentTextChanged.connect(self._describe_model)
        self.family_combo.currentTextChanged.connect(lambda _: self.model_edit.clear())  # weights of another family
        self._built = True
        self._describe_model()

    # -- choices -------------------------------------------------------------
    def family(self) -> str:
        return self.family_combo.currentText()

    def spec(self) -> str:
        weights = self.model_edit.text().strip()
        return f"{self.family()}:{weights}" if weights else self.family()

    def options(self) -> dict:
        """The family's options the user changed from their defaults (0 / unchanged: the model's own)."""
        family = self.family()
        if family == "cellpose":
            return {
                "diameter": self.diameter_spin.value() or None,
                "flow_threshold": self.flow_spin.value(),
                "cellprob_threshold": self.cellprob_spin.value(),
            }
        if family == "stardist":
            return {"prob_threshold": self.prob_spin.value() or None, "nms_threshold": self.nms_spin.value() or None}
        if family == "nuclei":
            return {"prob_threshold": self.prob_spin.value() or None}
        return {}

    def _describe_model(self) -> None:
        if not self._built:
            return
        family = self.family()
        self.model_edit.setPlaceholderText(FAMILIES[family])
        rows = {
            self.diameter_spin: family == "cellpose",
            self.flow_spin: family == "cellpose",
            self.cellprob_spin: family == "cellpose",
            self.prob_spin: family in ("stardist", "nuclei"),
            self.nms_spin: family == "stardist",
        }
        for spin, shown in rows.items():
            self.form.setRowVisible(spin, shown)
        notes = {
            "nuclei": "napari-nephro's own nuclei model: offline, on a CPU, at 0.5 µm/px (about 2 mm² of tissue "
            "a minute). Trained on MoNuSeg (CC BY-NC-SA 4.0): non-commercial use.",
            "cellpose": "Classic nuclei / cyto3 nets run on a CPU; Cellpose-SAM (cpsam) needs a GPU "
            "(about 200 s per 512 px image on a CPU).",
            "stardist": "Needs the [stardist] extra (TensorFlow); runs in its own process.",
            "cellvit": "CellViT runs at 0.25 µm/px on 1024 px tiles; a GPU model (minutes per tile on a CPU).",
        }
        self.model_info.setText(notes[family])

    def _browse(self) -> None:
        if self.family() in ("stardist", "nuclei"):
            path = QFileDialog.getExistingDirectory(self, f"{self.family()} model folder")
        else:
            path, _ = QFileDialog.getOpenFileName(self, f"{self.family()} weights")
        if path:
            self.model_edit.setText(path)

    def _key(self) -> tuple:
        return (self.spec(), self.device_combo.currentText(), tuple(sorted(self.options().items())))

    def segmenter(self):
        """The model, loaded once per family, weights, device and options."""
        from ...models.nuclei import load_nuclei_model

        options = self.options()
        key = self._key()
        old = self._segmenter
        model = self._cached(key, lambda: load_nuclei_model(key[0], device=key[1], **options))
        if old is not None and old is not model and hasattr(old, "close"):
            old.close()  # e.g. StarDist's TensorFlow process
        return model

    def output_path(self, layer) -> Path:
        text = self.out_edit.text().strip()
        if text:
            return Path(text)
        source = Path(layer.metadata["slide"].source)
        return source.with_name(f"{source.stem}.nuclei-{self.family()}.zarr")

    # -- running ---------------------------------------------------------------
    def run(self) -> None:
        """Load the model first, off the GUI thread (a TensorFlow process or a 2.8 GB checkpoint takes seconds),
        then estimate and run as the Segment widget does."""
        from napari.qt.threading import create_worker

        if self.slide_layer() is None or (self._segmenter is not None and self._segmenter_key == self._key()):
            super().run()
            return
        self.run_button.setEnabled(False)
        self.status.setText("Loading the model…")
        self._loader = create_worker(catching(self.segmenter, self.errors))
        self._loader.returned.connect(self._loaded)
        self._loader.errored.connect(self._failed)
        self._loader.errored.connect(lambda _: self.run_button.setEnabled(True))
        self._loader.start()

    def _loaded(self, outcome) -> None:
        self.run_button.setEnabled(True)
        if isinstance(outcome, UserFailure):
            self.status.setText(outcome)
            return
        super().run()

    def ready(self, layer) -> bool:
        """Say what the run costs on this device first; a long one starts only when Run is pressed again."""
        seconds, text = self.estimate(layer)
        key = (self.spec(), self.where_combo.currentText(), text)
        if seconds > LONG_RUN_SECONDS and self._confirmed != key:
            self._confirmed = key
            self.status.setText(f"{text}. Press Run again to start anyway.")
            return False
        self._confirmed = None
        return True

    def estimate(self, layer) -> tuple[float, str]:
        """Tissue tiles x the model's measured seconds per megapixel on a CPU (0 on a GPU: no figure to give)."""
        from ...inference import plan_run
        from ...inference.instance_api import cpu_cost

        slide = layer.metadata["slide"]
        if slide.mpp is None:
            raise SegmentError(f"{slide.source.name}: its pixel size is unknown; set it in Slide info first")
        model = self.segmenter()
        licence = getattr(model, "licence", "")
        if licence and licence not in self.model_info.text():  # the weights' own terms, once they are loaded
            self.model_info.setText(f"{self.model_info.text()} {licence}")
        plan = plan_run(slide, model, self.region(layer))
        cost = cpu_cost(plan, model, advice="choose cuda, or zoom onto a small field of view")
        if cost is None:
            return 0.0, f"{plan.tissue_tiles} tiles of {plan.tile} px on {getattr(model.device, 'type', model.device)}"
        seconds, text = cost
        return seconds, text.replace("use a GPU", "choose cuda").replace(
            "a smaller region", "zoom onto a small field of view"
        )

    def _job(self, layer):
        from ...inference.instance_api import segment_instances_region, segment_instances_slide

        slide = layer.metadata["slide"]
        if slide.mpp is None:
            raise SegmentError(f"{slide.source.name}: its pixel size is unknown; set it in Slide info first")
        common = {"batch_size": self.batch_size(), "progress": self.progressed.emit, "cancel": self._cancel.is_set}
        region = self.region(layer)
        if region is None:
            out = self.output_path(layer)
            resume = partial_path(out).exists() and not self.overwrite_check.isChecked()
            overwrite = self.overwrite_check.isChecked()
            scale = self.out_scale()
            return lambda: (
                "slide",
                segment_instances_slide(
                    slide, self.segmenter(), out, out_downsample=scale, resume=resume, overwrite=overwrite, **common
                ),
            )
        _, _, w, h = region
        downsample = 2 ** max(0, math.ceil(math.log2(math.sqrt(w * h / REGION_PIXELS)))) if w * h else 1
        return lambda: (
            "region",
            segment_instances_region(slide, self.segmenter(), region, out_downsample=downsample, **common),
        )

    def _add_region_result(self, layer, result):
        x, y, _, _ = result.region
        rows = [
            {"index": n.id, "class": result.classes[n.cls], "score": n.score, "area_um2": n.area_um2}
            for n in result.nuclei
        ]
        name = f"{self.family()} nuclei"
        return self._add_ids(layer, result.array, (y, x), result.out_downsample, rows, name)

    def _add_slide_result(self, layer, path: Path):
        from ...annotations.omezarr import read_label_zarr
        from ...inference.instance_api import read_nuclei_table

        if path.suffix.lower() != ".zarr":  # a table or QuPath detections: nothing to show as labels
            return None
        pyramid = read_label_zarr(path)
        downsample = slide_downsample(layer, pyramid)
        rows = []
        with open(path / "nuclei.csv", "rb") as f:
            count = sum(1 for _ in f) - 1
        table = read_nuclei_table(path) if count <= FEATURE_ROWS else []  # millions of rows: not into the layer
        if table:
            rows = [
                {"index": r["id"], "class": r["class"], "score": r["score"], "area_um2": r["area_um2"]} for r in table
            ]
        return self._add_ids(layer, pyramid.levels, (0, 0), downsample, rows, path.name)

    def _add_ids(self, layer, data, origin_yx, downsample: float, rows: list[dict], name: str):
        from .segment import aligned

        scale, translate = aligned(layer, origin_yx, downsample)
        features = {key: [r[key] for r in rows] for key in ("index", "class", "score", "area_um2")} if rows else None
        return self.viewer.add_labels(
            data,
            multiscale=isinstance(data, list),
            name=name,
            scale=scale,
            translate=translate,
            units=tuple(str(u) for u in layer.units),
            features=features,
            metadata={"nuclei": True},
        )


def _spin(low: float, high: float, step: float, value: float, special: str | None = None) -> QDoubleSpinBox:
    spin = QDoubleSpinBox(decimals=2, minimum=low, maximum=high, singleStep=step, value=value)
    if special:
        spin.setSpecialValueText(special)
    return spin
