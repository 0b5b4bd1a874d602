"""napari reader contribution: a slide becomes one multiscale RGB image layer in micrometres."""

from __future__ import annotations

from collections.abc import Callable

from ..annotations.labeltiff import is_label_tiff
from ..io import SlideError, can_open, open_slide
from .layers import slide_layer_data
from .reading import LayerData, as_paths, read_each


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Claim slide files and DICOM/MIRAX folders; return None for anything else."""
    paths = as_paths(path)
    if not paths or not all(can_open(p) for p in paths) or any(is_label_tiff(p) for p in paths):
        return None
    return read_slides


def read_slides(path: str | list[str]) -> list[LayerData]:
    """Open each path; a file that is not a readable slide becomes one notification line."""
    return read_each(path, lambda p: [slide_layer_data(open_slide(p))], (SlideError,))
