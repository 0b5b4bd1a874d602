"""How a Slide is shown as a napari layer, as plain data (no napari import here).

Kept apart from the reader so the CLI demo, the sample data and later widgets build
the same layer: name after the file, scale in micrometres, the Slide in metadata.
"""

from __future__ import annotations

from typing import Any

from ..io import Slide
from ..io.pyramid import display_pyramid


def slide_layer_kwargs(slide: Slide) -> dict[str, Any]:
    """Scale, units and metadata for an image layer of `slide` at level 0."""
    mpp = slide.mpp_yx
    return {
        "scale": mpp if mpp is not None else (1.0, 1.0),
        "units": ("um", "um") if mpp is not None else ("pixel", "pixel"),
        "axis_labels": ("y", "x"),
    }


def slide_layer_data(slide: Slide) -> tuple[list[Any], dict[str, Any], str]:
    """napari LayerData tuple: a multiscale RGB image named after the file.

    The file's own levels come first, then averaged levels for display where the
    file has too few (see `display_pyramid`); napari derives each level's scale
    from its shape.
    """
    kwargs = {
        "name": slide.source.name,
        "rgb": True,
        "multiscale": True,
        "contrast_limits": (0, 255),
        "metadata": {"slide": slide},
        **slide_layer_kwargs(slide),
    }
    return (display_pyramid(slide.levels), kwargs, "image")
