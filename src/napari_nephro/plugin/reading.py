"""What both napari readers share: path lists, notifications, and "refused is not a crash"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

LayerData = tuple[Any, dict[str, Any], str]


def as_paths(path: str | Path | list[str]) -> list[str | Path]:
    return [path] if isinstance(path, str | Path) else list(path)


def notify(message: str, error: bool = True) -> None:
    """One line in napari's notification area."""
    from napari.utils.notifications import show_error, show_warning

    (show_error if error else show_warning)(message)


def read_each(
    path: str | list[str], read_one: Callable[[str | Path], list[LayerData]], errors: tuple[type[Exception], ...]
) -> list[LayerData]:
    """Layers of every path `read_one` can read; each refused path becomes one error notification.

    When nothing could be read, napari gets its "read fine, nothing to show"
    sentinel, so a wrong file is a message, not a traceback dialog.
    """
    layers: list[LayerData] = []
    for p in as_paths(path):
        try:
            layers.extend(read_one(p))
        except errors as exc:
            notify(str(exc))
    return layers or [(None,)]  # type: ignore[list-item]


def current_slide_layer():
    """The one slide layer of the current napari viewer, or None when there is no viewer or not exactly one slide.

    Annotation files are in level-0 pixels of "the slide": readers and writers use
    this layer's scale and Slide to place them.
    """
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no Qt, no viewer: reading and writing still work, unscaled
        return None
    if viewer is None:
        return None
    slides = [layer for layer in viewer.layers if "slide" in layer.metadata]
    return slides[0] if len(slides) == 1 else None
