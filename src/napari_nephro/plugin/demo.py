"""`nephro demo`: napari with a slide, its glomeruli and nuclei, and the plugin's dock widgets."""

from __future__ import annotations

from pathlib import Path

from ..io import Slide
from .layers import slide_layer_data


def run_demo(
    slide: Slide,
    labels: Path | None = None,
    screenshot: Path | None = None,
    annotations: Path | None = None,
    nuclei: Path | None = None,
) -> int:
    """Show `slide`, the segmentation `labels`, its `nuclei` and, when given, the annotated objects as outlines."""
    import napari

    from ..annotations import read_annotations
    from ..annotations.omezarr import read_label_zarr
    from .annotation_reader import labels_layer_data, shapes_layer_data

    viewer = napari.Viewer(title=f"napari-nephro: {slide.source.name}", show=True)
    data, kwargs, _ = slide_layer_data(slide)
    viewer.add_image(data, **kwargs)
    scale = (kwargs["scale"], kwargs["units"])
    if labels is not None:
        data, kwargs, _ = labels_layer_data(read_label_zarr(labels), labels.name, scale)
        viewer.add_labels(data, **kwargs)
    if nuclei is not None:
        data, kwargs, _ = labels_layer_data(read_label_zarr(nuclei), nuclei.name, scale)
        viewer.add_labels(data, **kwargs)
    if annotations is not None:
        data, kwargs, _ = shapes_layer_data(read_annotations(annotations), f"annotated: {annotations.name}", scale)
        viewer.add_shapes(data, **kwargs)
    viewer.window.add_plugin_dock_widget("napari-nephro", "Slide info")
    viewer.window.add_plugin_dock_widget("napari-nephro", "Segment")
    viewer.window.add_plugin_dock_widget("napari-nephro", "Nuclei")
    viewer.scale_bar.visible = True  # in micrometres when the layer has them
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        viewer.window.resize(1400, 900)
        napari.qt.get_qapp().processEvents()
        viewer.screenshot(str(screenshot), canvas_only=False)
        viewer.close()
        print(f"screenshot saved to {screenshot}")
        return 0
    napari.run()
    return 0
