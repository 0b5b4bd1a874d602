"""Catch truncated or damaged TIFF-based slides at open time, quietly.

A slide cut short by an interrupted copy often still has a readable first
directory: OpenSlide and tifffile would open it and fail later, tile by tile,
while the user pans, or silently drop the label and macro images. Walking every
directory and checking that all image data lies inside the file costs a few
milliseconds and turns that into one clear message now.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SlideError


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def quiet_tifffile() -> Iterator[list[str]]:
    """Collect tifffile's warnings instead of letting them reach the user's terminal."""
    logger = logging.getLogger("tifffile")
    handler, propagate = _Collect(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def check_complete(tif, path: Path, warnings: list[str]) -> None:
    """Raise SlideError if any directory or image data of `tif` lies past the end of the file."""
    size = os.path.getsize(path)
    pages = list(tif.pages)  # walks the whole directory chain
    broken = [m for m in warnings if "offset" in m and "invalid" in m]
    if broken or not pages:
        detail = broken[0].split("> ", 1)[-1] if broken else "no image directory"
        raise SlideError(path, f"file is truncated or damaged ({detail}, file size {size} bytes)")
    for page in pages:
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False) if n]
        if ends and max(ends) > size:
            raise SlideError(path, f"file is truncated: its image data needs {max(ends)} bytes, the file has {size}")


def verify_tiff(path: Path) -> None:
    """`check_complete` for a file some other reader (OpenSlide) will open."""
    import tifffile

    with quiet_tifffile() as warnings:
        try:
            with tifffile.TiffFile(str(path)) as tif:
                check_complete(tif, path, warnings)
        except (tifffile.TiffFileError, ValueError, OSError) as exc:
            raise SlideError(path, f"file is truncated or damaged ({exc})") from None
