"""A label that wraps within its dock, whatever it says, and keeps the whole text in its tooltip."""

from __future__ import annotations

import re

from qtpy.QtWidgets import QLabel, QSizePolicy

BREAK = "\u200b"  # zero-width space: lets Qt break a long path after its separators
LONG_WORD = re.compile(r"\S{24,}")  # a word this long may not fit a dock: break it after its separators
SEPARATOR = re.compile(r"([/\\])")


class WrappingLabel(QLabel):
    """A word-wrapped QLabel that never widens its dock (a long path breaks after '/'), full text as tooltip.

    Its width is whatever the layout gives; its height follows from it (height for
    width), so no line is cut off at any dock size.
    """

    def __init__(self, text: str = "") -> None:
        super().__init__()
        self.setWordWrap(True)
        policy = QSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        policy.setHeightForWidth(True)
        self.setSizePolicy(policy)
        self.setText(text)

    def setText(self, text: str) -> None:
        super().setText(LONG_WORD.sub(lambda m: SEPARATOR.sub(r"\1" + BREAK, m.group()), text))
        self.setToolTip(text)
        self.updateGeometry()

    def plain_text(self) -> str:
        """The text as set (without the break hints)."""
        return self.text().replace(BREAK, "")
