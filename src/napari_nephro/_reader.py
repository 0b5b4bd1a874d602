"""napari reader contribution: a slide becomes one multiscale RGB image layer in micrometres."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .io import Slide, SlideError, can_open, open_slide
from .layers import slide_layer_data

LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Claim slide files and DICOM/MIRAX folders; return None for anything else."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(can_open(p) for p in paths):
        return None
    return read_slides


def read_slides(path: str | list[str]) -> list[LayerData]:
    """Open each path; a file that is not a readable slide becomes one notification line."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        try:
            slide = open_slide(p)
        except SlideError as exc:
            _notify_error(str(exc))
            continue
        layers.append(slide_layer_data(slide))
    # napari's "read fine, nothing to show" sentinel: a refused file is not a crash.
    return layers or [(None,)]  # type: ignore[list-item]


def _notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def slide_of(layer: Any) -> Slide | None:
    """The Slide behind a layer this reader made, if any."""
    return layer.metadata.get("slide") if hasattr(layer, "metadata") else None
