"""Where a review project's patches lie: random squares in tissue, none overlapping another, the same for a seed.

Tissue is judged once per slide on a thumbnail (`tiling.tissue_mask`, the test the
engine and the tile export use), never by reading candidates at full resolution:
a patch qualifies when at least half of its thumbnail pixels are tissue. Candidate
corners lie on the thumbnail's grid, whose step divides the patch side into at
most CELLS_PER_PATCH cells, which is finer than a half-tissue test needs. Patches
are then drawn at random (numpy's Generator, so a seed gives the same patches on
any machine) and kept unless they touch one already kept: random sequential
adsorption, which is uniform enough for a rater's sample and cannot loop forever.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..common.limits import mpp_problem, tile_problem
from ..io import Slide
from ..tiling import read_scaled, tissue_mask
from .layout import NAME, Patch, ReviewError, patch_id

SAMPLINGS = ("random", "stratified")
MIN_TISSUE = 0.5  # share of a patch that must be tissue
THUMBNAIL_SIDE = 2048  # the tissue thumbnail's longer side, at most (unless patches are tinier than its pixels)
CELLS_PER_PATCH = 16  # thumbnail pixels along a patch side, at most
CHUNK = 4096  # candidates screened against the kept patches at once, before the exact one-by-one check


class _Candidates:
    """One slide's possible patch corners on its tissue thumbnail, and the patches kept so far."""

    def __init__(self, slide_id: str, slide: Slide, size: int, mpp: float) -> None:
        if slide.mpp is None:
            raise ReviewError(
                f"slide {slide_id}: its pixel size is unknown; give it (--image-mpp in the shell, the mpp box in napari)"
            )
        self.slide_id = slide_id
        self.side = size * mpp / slide.mpp  # level-0 pixels along a patch side
        height, width = slide.level_shapes[0]
        self.positions = np.zeros((0, 2), np.int64)
        if self.side > width or self.side > height:
            return
        # k thumbnail pixels per patch side, so the step is a whole fraction of it; at least one level-0 pixel,
        # so distinct corners are distinct level-0 pixels
        k = min(CELLS_PER_PATCH, math.floor(self.side * THUMBNAIL_SIDE / max(height, width)), math.floor(self.side))
        self.k = max(1, k)
        self.step = self.side / self.k
        th, tw = math.ceil(height / self.step), math.ceil(width / self.step)
        thumb = read_scaled(slide, (0, 0, tw * self.step, th * self.step), (th, tw))
        tissue = tissue_mask(thumb).astype(np.int32)
        integral = np.zeros((th + 1, tw + 1), np.int64)
        integral[1:, 1:] = tissue.cumsum(0).cumsum(1)
        # corners whose patch lies wholly on the slide: floor(t * step) + side <= length
        ny = math.floor((height - self.side) / self.step + 1e-9) + 1
        nx = math.floor((width - self.side) / self.step + 1e-9) + 1
        k = self.k
        ys, xs = np.arange(ny), np.arange(nx)
        y1, x1 = np.minimum(ys + k, th), np.minimum(xs + k, tw)
        counts = (
            integral[y1][:, x1] - integral[ys][:, x1] - integral[y1][:, xs] + integral[ys][:, xs]
        )  # tissue pixels under each corner's patch
        self.positions = np.argwhere(counts >= MIN_TISSUE * k * k)
        # thumbnail corners a kept patch rules out: within k cells either way (a margin of one cell keeps the
        # level-0 boxes, whose corners are floored, from sharing even a pixel)
        self.taken = np.zeros((ny, nx), bool)

    def __len__(self) -> int:
        return len(self.positions)

    def free(self, index: np.ndarray) -> np.ndarray:
        ty, tx = self.positions[index].T
        return ~self.taken[ty, tx]

    def keep(self, index: int) -> Patch | None:
        """The patch at candidate `index`, now kept; None when a kept one overlaps it."""
        ty, tx = (int(v) for v in self.positions[index])
        if self.taken[ty, tx]:
            return None
        k = self.k
        self.taken[max(0, ty - k) : ty + k + 1, max(0, tx - k) : tx + k + 1] = True
        side = round(self.side, 6)
        return Patch(
            "", self.slide_id, float(math.floor(tx * self.step)), float(math.floor(ty * self.step)), side, side
        )


def _draw(pools: list[_Candidates], order: np.ndarray, offsets: np.ndarray, wanted: int) -> list[Patch]:
    """Candidates taken in `order` (indices into the pools laid end to end) until `wanted` are kept."""
    kept: list[Patch] = []
    for start in range(0, len(order), CHUNK):
        chunk = order[start : start + CHUNK]
        which = np.searchsorted(offsets, chunk, side="right") - 1
        local = chunk - offsets[which]
        free = np.ones(len(chunk), bool)
        for p in np.unique(which):
            here = which == p
            free[here] = pools[p].free(local[here])
        for p, i in zip(which[free], local[free], strict=True):
            patch = pools[p].keep(int(i))
            if patch is not None:
                kept.append(patch)
                if len(kept) == wanted:
                    return kept
    return kept


def sample_patches(
    slides: list[tuple[str, Slide]], n: int, size: int, mpp: float, seed: int, sampling: str = "random"
) -> list[Patch]:
    """`n` patches of `size` px at `mpp` um/px, each at least half tissue, none overlapping, the same for a `seed`.

    slides: (id, slide) pairs; the ids go into the patches. "random" draws from the
    candidates of all slides pooled (a slide with more tissue gives more patches);
    "stratified" draws as many from each slide (the remainder from the first
    slides) and interleaves them, slide by slide, so that a rater who stops early
    has seen every slide. Patch ids (p0001, ...) follow that order. Raises
    ReviewError, saying how many fit, when fewer than asked fit.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ReviewError(f"the number of patches must be a whole number of at least 1, not {n!r}")
    problem = tile_problem(size, "patch") or mpp_problem(mpp, "patches")
    if problem:
        raise ReviewError(problem)
    if sampling not in SAMPLINGS:
        raise ReviewError(f"sampling must be one of {', '.join(SAMPLINGS)}, not {sampling!r}")
    if not slides:
        raise ReviewError("no slides to sample patches from")
    rng = np.random.default_rng(seed)
    pools = [_Candidates(slide_id, slide, size, mpp) for slide_id, slide in slides]
    what = f"patches of {size} px at {mpp:g} um/px"
    if sampling == "random":
        sizes = np.array([len(p) for p in pools], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        kept = _draw(pools, rng.permutation(int(sizes.sum())), offsets, n)
        if len(kept) < n:
            raise ReviewError(
                f"only {len(kept)} {what} fit in the tissue of {_slides(pools)} without overlapping ({n} asked): "
                "ask for fewer patches or a smaller size, or add slides"
            )
    else:
        quotas = [n // len(pools) + (i < n % len(pools)) for i in range(len(pools))]
        per_slide = []
        for pool, quota in zip(pools, quotas, strict=True):
            found = _draw([pool], rng.permutation(len(pool)), np.zeros(1, np.int64), quota) if quota else []
            if len(found) < quota:
                raise ReviewError(
                    f"only {len(found)} {what} fit in the tissue of slide {pool.slide_id} without overlapping "
                    f"({quota} asked of it): ask for fewer patches or a smaller size, or sample at random"
                )
            per_slide.append(found)
        kept = [p for group in _interleave(per_slide) for p in group]
    return [Patch(patch_id(i), p.slide, p.x, p.y, p.width, p.height) for i, p in enumerate(kept)]


def _interleave(groups: list[list[Patch]]) -> list[list[Patch]]:
    """[[a1, a2], [b1]] -> [[a1, b1], [a2]]: one patch of each slide in turn."""
    longest = max((len(g) for g in groups), default=0)
    return [[g[i] for g in groups if i < len(g)] for i in range(longest)]


def _slides(pools: list[_Candidates]) -> str:
    return f"slide {pools[0].slide_id}" if len(pools) == 1 else f"the {len(pools)} slides"


def slide_ids(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """A short id per slide for patches.csv: its file stem (a DICOM folder's name), made safe and unique."""
    ids: list[str] = []
    for path in paths:
        stem = Path(path).name if Path(path).is_dir() else Path(path).stem
        base = safe_name(stem, "slide")
        name, i = base, 2
        while name in ids:
            name, i = f"{base}-{i}", i + 1
        ids.append(name)
    return ids


def safe_name(text: str, fallback: str) -> str:
    """`text` made a valid project name (letters, digits, '.', '_', '-'; 64 at most), else `fallback`."""
    name = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in str(text)).strip("-._")
    name = name[:56]  # room for a -2, -3 ... to make it unique
    return name if NAME.match(name) else fallback
