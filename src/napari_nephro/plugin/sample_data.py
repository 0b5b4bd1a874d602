"""napari sample data: the real kidney sample, opened through the plugin's own readers, with its glomeruli."""

from __future__ import annotations

from ..io import open_slide
from ..sample import sample_annotations_path, sample_slide_path
from .annotation_reader import shapes_layer_data
from .layers import slide_layer_data


def sample_slide():
    """The slide as a multiscale image and the annotated glomeruli as outlines on it, in micrometres."""
    from ..annotations import read_annotations

    slide = slide_layer_data(open_slide(sample_slide_path()))
    kwargs = slide[1]
    path = sample_annotations_path()
    name = f"annotated: {path.name}"
    return [slide, shapes_layer_data(read_annotations(path), name, scale=(kwargs["scale"], kwargs["units"]))]
