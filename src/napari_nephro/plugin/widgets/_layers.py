"""What the dock widgets share: which layers are slides, and layer-choice combo boxes that keep the choice."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox

from ...io import Slide


def slide_layers(viewer) -> list:
    """Image layers showing a Slide (the reader and the sample put it in their metadata)."""
    return [layer for layer in viewer.layers if isinstance(layer.metadata.get("slide"), Slide)]


def labels_layers(viewer, exclude=None) -> list:
    from napari.layers import Labels

    return [layer for layer in viewer.layers if isinstance(layer, Labels) and layer is not exclude]


def refill(combo: QComboBox, names: list[str], default: int = 0) -> None:
    """Offer `names`, keeping the current choice when it is still there (else the `default`-th), silently."""
    current = combo.currentText()
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(names)
    if current in names:
        combo.setCurrentText(current)
    elif len(names) > default:
        combo.setCurrentIndex(default)
    combo.blockSignals(False)


def chosen(combo: QComboBox, layers: list):
    """The layer named in `combo`, among `layers`."""
    return next((layer for layer in layers if layer.name == combo.currentText()), None)


class UserFailure(str):
    """A worker's one-line answer to a user's mistake, returned (not raised) so napari shows no traceback."""


def catching(job, errors: tuple[type[BaseException], ...]):
    """`job` for a worker, with the users' mistakes (`errors`) returned as a UserFailure."""

    def run():
        try:
            return job()
        except errors as exc:
            return UserFailure(str(exc))

    return run
