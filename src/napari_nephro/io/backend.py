"""What every slide reader provides, so `Slide` can stay format-agnostic."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from .errors import SlideError

# Micrometres per pixel outside this range come from a default resolution tag
# (72 dpi is 352.8 um/px), not from a microscope, and are reported as unknown.
PLAUSIBLE_MPP = (0.01, 50.0)

# Declared sizes beyond these are a damaged or hostile header, not a slide, and are refused
# at open: a 75 x 25 mm slide at 0.25 um/px is about 30 Gpx, a 50 x 25 mm scan at 0.11 um/px
# about 100 Gpx, and no scanner's tile comes near 128 Mpx (a decoded tile that size is 384 MiB
# of RGB, held by each reading thread).
MAX_LEVEL_PIXELS = 2**38  # ~275 Gpx
MAX_TILE_PIXELS = 2**27  # ~134 Mpx: one tile, or one strip that must be decoded whole


class Backend(Protocol):
    """One opened file. Tiles are the file's own tiles; level 0 is the finest."""

    name: str  # "openslide", "tifffile" or "image"
    vendor: str | None
    level_shapes: list[tuple[int, int]]  # (height, width) per level
    level_downsamples: list[float]
    tile_shapes: list[tuple[int, int]]  # (height, width) of a full tile per level
    mpp_yx: tuple[float, float] | None  # level 0, micrometres per pixel
    objective_power: float | None
    properties: Mapping[str, str]
    associated_names: list[str]

    def read_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        """Tile (ty, tx) of a level as (h, w, 3) uint8, clipped at the level's edge."""
        ...

    def read_associated(self, name: str) -> np.ndarray:
        """An associated image (label, macro, thumbnail) as (h, w, 3) uint8."""
        ...

    def close(self) -> None: ...


WHITE = (255, 255, 255)


def megapixels(pixels: float) -> str:
    """A pixel count in words: "134 Mpx", "68.7 Gpx", "1 Tpx"."""
    for unit, size in (("Tpx", 1e12), ("Gpx", 1e9)):
        if pixels >= size:
            return f"{pixels / size:.3g} {unit}"
    return f"{pixels / 1e6:.3g} Mpx"


def check_geometry(
    path, level_shapes: list[tuple[int, int]], tile_shapes: list[tuple[int, int]], units: list[str] | None = None
) -> None:
    """Refuse (SlideError) levels or tiles no real slide has, before anything is allocated for them."""
    for i, (h, w) in enumerate(level_shapes):
        if h < 1 or w < 1:
            raise SlideError(path, f"level {i} is empty ({w} x {h} pixels)")
        if h * w > MAX_LEVEL_PIXELS:
            raise SlideError(
                path,
                f"level {i} declares {w} x {h} pixels ({megapixels(h * w)}), more than any slide has: "
                f"the limit is {megapixels(MAX_LEVEL_PIXELS)} (2^38 pixels)",
            )
    for i, (th, tw) in enumerate(tile_shapes):
        if th < 1 or tw < 1 or th * tw > MAX_TILE_PIXELS:
            raise SlideError(
                path,
                f"level {i} declares {units[i] if units else 'tiles'} of {tw} x {th} pixels ({megapixels(th * tw)}); "
                f"the limit is {megapixels(MAX_TILE_PIXELS)} (2^27 pixels) for one tile or strip",
            )


def parse_float(text: str | None) -> float | None:
    """A number from file metadata, or None for what writers put there instead ("0,5", "20x", "")."""
    try:
        return float(text) if text not in (None, "") else None
    except (TypeError, ValueError):
        return None


def mpp_pair(mpp_y: float | None, mpp_x: float | None) -> tuple[float, float] | None:
    """(y, x) micrometres per pixel; a file that gives only one axis has square pixels."""
    if not (mpp_y or mpp_x):
        return None
    return (mpp_y or mpp_x, mpp_x or mpp_y)


def plausible_mpp(value: float | None) -> float | None:
    """`value` if it can be a microscope's pixel size, else None (unknown)."""
    if value is None or not np.isfinite(value):
        return None
    lo, hi = PLAUSIBLE_MPP
    return float(value) if lo <= value <= hi else None


def to_rgb(pixels: np.ndarray, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """(h, w[, 1|3|4]) uint8 -> (h, w, 3) uint8; transparency is laid over `background`.

    Brightfield background is white, so a transparent pixel (outside the scanned
    area) must be white too rather than black.
    """
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = pixels.shape[2]
    if channels == 3:
        return np.ascontiguousarray(pixels)
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    rgb, alpha = pixels[..., :3], pixels[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    weight = alpha.astype(np.float32) / 255.0
    bg = np.asarray(background, dtype=np.float32)
    out = rgb.astype(np.float32) * weight + bg * (1.0 - weight)
    return np.rint(out).astype(np.uint8)
