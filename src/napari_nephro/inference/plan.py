"""Where a run's tiles lie: a working grid at the model's pixel size, and which tiles hold tissue.

Three grids are involved. Level 0 is the slide's own. The working grid is the
model's (its mpp): tiles are laid on it in whole pixels, so stitching is exact
integer arithmetic. The output grid is what the user gets: for a whole-slide file
by default the working grid itself ("working"), since writing 16 level-0 pixels
per working pixel at 0.25 um/px cost more than the model; "full" is level 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..common.limits import MAX_TILE, mpp_problem
from ..io import Slide
from ..tiling import GridError, read_scaled, tile_grid, tissue_mask
from .errors import SegmentError

THUMBNAIL_SIDE = 2048  # the tissue map is read at most this large, from a coarse level
WORKING, FULL = "working", "full"  # output scales by name: the model's grid, the slide's level 0


@dataclass(frozen=True)
class GridTile:
    """One tile: its row in the grid, its corner on the working grid, and whether it holds tissue."""

    row: int
    y: int
    x: int
    tissue: bool = True


@dataclass
class Plan:
    """The geometry of one run; everything a resumed run must find unchanged."""

    region: tuple[int, int, int, int]  # x, y, width, height in level-0 pixels
    scale: float  # level-0 pixels per working pixel (model mpp / slide mpp)
    out_downsample: float  # level-0 pixels per output pixel
    tile: int
    overlap: int
    tiles: list[GridTile] = field(default_factory=list)
    tissue_fraction: float | None = None  # of the region, from the tissue map; None when glass was not looked for

    @property
    def work_shape(self) -> tuple[int, int]:
        _, _, w, h = self.region
        return cells(h, self.scale), cells(w, self.scale)

    @property
    def out_shape(self) -> tuple[int, int]:
        _, _, w, h = self.region
        return cells(h, self.out_downsample), cells(w, self.out_downsample)

    @property
    def row_starts(self) -> list[int]:
        return sorted({t.y for t in self.tiles})

    @property
    def tissue_tiles(self) -> int:
        """Tiles the model will see (glass skipped)."""
        return len(self.tiles) - self.skipped

    def level0_box(self, tile: GridTile) -> tuple[float, float, float, float]:
        x0, y0, _, _ = self.region
        s = self.scale
        return (x0 + tile.x * s, y0 + tile.y * s, self.tile * s, self.tile * s)

    @property
    def skipped(self) -> int:
        return sum(not t.tissue for t in self.tiles)

    def describe(self) -> dict:
        """The plan as JSON-able values, to store with a partial run and compare on resume."""
        return {
            "region": list(self.region),
            "scale": round(self.scale, 9),
            "out_downsample": round(self.out_downsample, 9),
            "tile": self.tile,
            "overlap": self.overlap,
            "tiles": len(self.tiles),
        }


def cells(length: int, step: float) -> int:
    """Pixels of size `step` needed to cover `length` (at least one)."""
    return max(1, math.ceil(length / step - 1e-6))


def resolve_downsample(out_downsample: float | str, scale: float) -> float:
    """Level-0 pixels per output pixel for `out_downsample`: a number, "full" (1) or "working" (`scale`).

    "working" is the working grid exactly (so the engine copies rows instead of
    resampling them), but never finer than level 0: a model finer than the slide
    writes full resolution.
    """
    if isinstance(out_downsample, str):
        if out_downsample == WORKING:
            return max(1.0, float(scale))
        if out_downsample == FULL:
            return 1.0
        raise SegmentError(f"the output scale must be {WORKING!r}, {FULL!r} or a number, not {out_downsample!r}")
    d = float(out_downsample)
    if not math.isfinite(d) or d <= 0:
        raise SegmentError(f"out_downsample must be a positive number, not {out_downsample}")
    return d


def output_mpp(slide_mpp: float, downsample: float) -> float:
    """Micrometres per output pixel, without the last bit of float noise (0.499 * (1 / 0.499) is 1, not 0.99999...)."""
    return float(f"{slide_mpp * downsample:.12g}")


def check_region(slide: Slide, region: tuple[float, float, float, float] | None) -> tuple[int, int, int, int]:
    """The region in whole level-0 pixels, clipped to the slide; one nowhere on it is an error."""
    height, width = slide.level_shapes[0]
    if region is None:
        return (0, 0, width, height)
    x, y, w, h = region
    if not all(math.isfinite(v) for v in region):
        raise SegmentError(f"region {_fmt(region)}: X, Y, W and H must be finite numbers")
    if w <= 0 or h <= 0:
        raise SegmentError(f"region {_fmt(region)} is empty: width and height must be positive")
    x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
    x1, y1 = min(width, math.ceil(x + w)), min(height, math.ceil(y + h))
    if x1 <= x0 or y1 <= y0:
        raise SegmentError(f"region {_fmt(region)} lies outside the {width} x {height} slide")
    return (x0, y0, x1 - x0, y1 - y0)


def _fmt(region) -> str:
    return ",".join(f"{v:g}" for v in region)


def slide_mpp(slide: Slide) -> float:
    if slide.mpp is None:
        raise SegmentError(
            f"{slide.source.name}: its pixel size is unknown; give the micrometres per pixel at full "
            "resolution (--mpp in the shell, the mpp box in napari)"
        )
    return slide.mpp


def make_plan(
    slide: Slide,
    *,
    model_mpp: float,
    tile: int,
    overlap: int,
    region: tuple[float, float, float, float] | None = None,
    out_downsample: float | str = 1.0,
    skip_background: bool = True,
    min_tissue: float = 0.001,
) -> Plan:
    """Lay the tiles over `region` (default: the whole slide) and mark those with no tissue.

    Tissue is judged on one thumbnail of the region read from a coarse level, so a
    slide that is mostly glass costs the model only its tissue.
    """
    if tile <= 0 or not 0 <= overlap < tile:
        raise SegmentError(f"tile must be positive and overlap in [0, tile), not tile={tile} overlap={overlap}")
    if tile > MAX_TILE:  # models take 256 to 1024 px; larger tiles only multiply memory
        raise SegmentError(f"tiles of {tile} px are too large: at most {MAX_TILE} px a side")
    problem = mpp_problem(model_mpp, "model's tiles")
    if problem:
        raise SegmentError(problem)
    # only "working" needs the slide's mpp: any other scale, or a wrong one, is settled before it is asked for
    downsample = None if out_downsample == WORKING else resolve_downsample(out_downsample, 1.0)
    box = check_region(slide, region)
    scale = model_mpp / slide_mpp(slide)
    if downsample is None:
        downsample = resolve_downsample(WORKING, scale)
    plan = Plan(box, scale, downsample, tile, overlap)
    work_h, work_w = plan.work_shape
    try:
        grid = tile_grid((0, 0, work_w, work_h), tile=tile, overlap=overlap)
    except GridError as exc:  # a run's mistakes are SegmentErrors, which the widgets show
        raise SegmentError(str(exc)) from None
    starts = sorted({int(t.y) for t in grid})
    rows = {y: i for i, y in enumerate(starts)}
    tissue = None
    if skip_background:
        tissue, plan.tissue_fraction = _tissue_by_tile(slide, plan, grid)
    plan.tiles = [
        GridTile(rows[int(t.y)], int(t.y), int(t.x), True if tissue is None else bool(tissue[i] >= min_tissue))
        for i, t in enumerate(grid)
    ]
    return plan


def _tissue_by_tile(slide: Slide, plan: Plan, grid) -> tuple[np.ndarray, float]:
    """Fraction of each tile's footprint (inside the region) that looks like tissue on a thumbnail, and of the region."""
    x0, y0, w, h = plan.region
    step = max(w, h) / THUMBNAIL_SIDE  # level-0 pixels per thumbnail pixel
    step = max(step, min(plan.scale * 4, max(w, h) / 64))  # no finer than a quarter of the working grid
    th, tw = cells(h, step), cells(w, step)
    thumb = read_scaled(slide, (x0, y0, tw * step, th * step), (th, tw))
    found = tissue_mask(thumb)
    mask = ndimage.binary_dilation(found)  # faint tissue edges must not drop a tile
    fractions = np.zeros(len(grid))
    for i, t in enumerate(grid):
        ty0, tx0 = int(t.y * plan.scale / step), int(t.x * plan.scale / step)
        ty1 = max(ty0 + 1, math.ceil((t.y + plan.tile) * plan.scale / step))
        tx1 = max(tx0 + 1, math.ceil((t.x + plan.tile) * plan.scale / step))
        footprint = mask[ty0:ty1, tx0:tx1]
        fractions[i] = footprint.mean() if footprint.size else 0.0
    return fractions, float(found.mean())
