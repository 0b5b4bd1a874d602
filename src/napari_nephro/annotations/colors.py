"""Class colours: the evaluation colours are fixed (TP green, FP yellow, FN red, as in the paper)."""

from __future__ import annotations

import colorsys
import zlib

KNOWN = {
    "glomerulus": (0, 160, 255),
    "normal": (0, 200, 0),
    "segmental sclerosis": (255, 160, 0),
    "global sclerosis": (200, 0, 200),
    "nucleus": (90, 40, 200),
}


def class_color(name: str) -> tuple[int, int, int]:
    """A stable colour per class name, the same in every session and file."""
    if name.lower() in KNOWN:
        return KNOWN[name.lower()]
    hue = (zlib.crc32(name.encode()) % 360) / 360
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return (round(r * 255), round(g * 255), round(b * 255))
