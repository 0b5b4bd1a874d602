"""The sizes and scales a tile can have, checked in one place by every command that lays tiles.

Beyond these a request is a mistake, not a slide: a tile of 100,000 px or a pixel
size of 1e-9 um asks for tens of GiB or for billions of tiles. Each caller raises
its own error type with the sentence `tile_problem` / `mpp_problem` return.
"""

from __future__ import annotations

import math

MIN_TILE, MAX_TILE = 16, 8192  # tile side in pixels at its mpp: models take 256 to 1024
WORK_MPP = (0.05, 50.0)  # micrometres per pixel of tiles: beyond an 80x objective to a coarse overview
MAX_GRID_TILES = 10_000_000  # tiles in one grid: a 30 Gpx slide at 0.25 um/px has ~30,000 of 1024 px at 1 um/px


def tile_problem(tile, what: str = "tile") -> str | None:
    """Why `tile` cannot be a tile side, or None."""
    if isinstance(tile, bool) or not isinstance(tile, int):
        return f"the {what} size must be a whole number of pixels, not {tile!r}"
    if not MIN_TILE <= tile <= MAX_TILE:
        return f"the {what} size must be between {MIN_TILE} and {MAX_TILE} px, not {tile}"
    return None


def mpp_problem(mpp, what: str = "tiles") -> str | None:
    """Why `mpp` cannot be the pixel size of `what`, or None."""
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not math.isfinite(mpp):
        return f"the pixel size of the {what} must be a finite number, not {mpp!r}"
    lo, hi = WORK_MPP
    if not lo <= mpp <= hi:
        return f"the pixel size of the {what} must be between {lo:g} and {hi:g} um/px, not {mpp:g}"
    return None
