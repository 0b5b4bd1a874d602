"""napari sample data: the synthetic slide, opened through the plugin's own reader."""

from __future__ import annotations

from .io import open_slide
from .layers import slide_layer_data
from .sample import sample_slide_path


def sample_slide():
    return [slide_layer_data(open_slide(sample_slide_path()))]
