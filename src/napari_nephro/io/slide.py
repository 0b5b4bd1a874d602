"""`Slide`: one opened whole-slide image as a lazy dask pyramid with physical units."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from .backend import PLAUSIBLE_MPP, Backend, plausible_mpp
from .cache import DEFAULT_CACHE_BYTES, TileCache
from .errors import SlideError


@dataclass(frozen=True)
class Level:
    """One pyramid level as the file stores it."""

    index: int
    shape: tuple[int, int]  # (height, width) in pixels
    downsample: float  # relative to level 0
    tile: tuple[int, int]  # (height, width) of the file's tiles = the dask chunks
    mpp: tuple[float, float] | None  # (y, x) micrometres per pixel, None if unknown


class Slide:
    """A whole-slide image: levels as dask arrays (Y, X, 3) uint8 read only on compute.

    Every level is chunked on the file's own tiles, and every tile read, whether
    through dask or `region`, goes through one LRU cache of decoded tiles. Pickling
    a Slide reopens the file by path, so levels can be computed on dask workers.
    """

    def __init__(
        self,
        path: Path,
        backend: Backend,
        *,
        mpp: float | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        source: Path | None = None,
    ):
        self.path = path  # the file the backend opened
        self.source = source or path  # what the user asked for: a file, or a DICOM folder
        self._backend = backend
        self.cache = TileCache(cache_bytes)
        self._mpp_override = _valid_mpp(path, mpp) if mpp is not None else None
        stat = os.stat(path) if path.is_file() else None
        self._token = f"{path}-{stat.st_mtime_ns}-{stat.st_size}" if stat else str(path)
        self.levels: list[da.Array] = [self._level_array(i) for i in range(len(backend.level_shapes))]

    # -- what the file says -------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def vendor(self) -> str | None:
        return self._backend.vendor

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._backend.properties)

    @property
    def objective_power(self) -> float | None:
        return self._backend.objective_power

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return list(self._backend.level_shapes)

    @property
    def level_downsamples(self) -> list[float]:
        return list(self._backend.level_downsamples)

    @property
    def tile_shapes(self) -> list[tuple[int, int]]:
        return list(self._backend.tile_shapes)

    @property
    def associated_images(self) -> list[str]:
        """Names of the label, macro, thumbnail... images stored beside the pyramid."""
        return list(self._backend.associated_names)

    def associated_image(self, name: str) -> np.ndarray:
        if name not in self._backend.associated_names:
            raise SlideError(
                self.path, f"has no associated image {name!r} (it has: {', '.join(self.associated_images) or 'none'})"
            )
        return self._backend.read_associated(name)

    # -- physical size ------------------------------------------------------
    @property
    def mpp_yx(self) -> tuple[float, float] | None:
        """Level-0 micrometres per pixel (y, x): the user's value if set, else the file's."""
        if self._mpp_override is not None:
            return (self._mpp_override, self._mpp_override)
        return self._backend.mpp_yx

    @property
    def mpp(self) -> float | None:
        """Level-0 micrometres per pixel (mean of x and y), or None when unknown."""
        yx = self.mpp_yx
        return None if yx is None else (yx[0] + yx[1]) / 2

    @property
    def mpp_source(self) -> str:
        if self._mpp_override is not None:
            return "user"
        return "file" if self._backend.mpp_yx is not None else "unknown"

    def set_mpp(self, mpp: float | None) -> None:
        """Set the level-0 pixel size the file lacks (or correct it); None reverts to the file's."""
        self._mpp_override = None if mpp is None else _valid_mpp(self.path, mpp)

    def level_mpp(self, level: int) -> tuple[float, float] | None:
        yx = self.mpp_yx
        if yx is None:
            return None
        (h0, w0), (h, w) = self.level_shapes[0], self.level_shapes[level]
        return (yx[0] * h0 / h, yx[1] * w0 / w)

    def level_info(self, level: int) -> Level:
        return Level(
            level,
            self.level_shapes[level],
            self.level_downsamples[level],
            self.tile_shapes[level],
            self.level_mpp(level),
        )

    # -- pixels -------------------------------------------------------------
    def read_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        """One of the file's tiles, decoded once and then served from the cache."""
        return self.cache.get_or_load((level, ty, tx), lambda: self._backend.read_tile(level, ty, tx))

    def region(self, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
        """Pixels of `box` = (x, y, width, height) in `level`'s own pixel coordinates."""
        if not 0 <= level < self.level_count:
            raise SlideError(self.path, f"has no level {level} (levels 0 to {self.level_count - 1})")
        x, y, w, h = (int(v) for v in box)
        height, width = self.level_shapes[level]
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
            raise SlideError(self.path, f"region x={x} y={y} w={w} h={h} is outside level {level} ({width} x {height})")
        return self._read(level, y, y + h, x, x + w)

    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        th, tw = self.tile_shapes[level]
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self.read_tile(level, ty, tx)
                ya, xa = ty * th, tx * tw  # tile origin
                sy0, sy1 = max(y0, ya), min(y1, ya + tile.shape[0])
                sx0, sx1 = max(x0, xa), min(x1, xa + tile.shape[1])
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[sy0 - ya : sy1 - ya, sx0 - xa : sx1 - xa]
        return out

    def _level_array(self, level: int) -> da.Array:
        th, tw = self.tile_shapes[level]
        return da.from_array(
            _LevelView(self, level),
            chunks=(th, tw, 3),
            name=f"nephro-slide-{da.core.tokenize(self._token, level)}",
            asarray=False,
            fancy=False,
            lock=False,
            meta=np.empty((0, 0, 0), np.uint8),
        )

    # -- description --------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Everything `nephro info` and the Slide info widget show, JSON-ready."""
        return {
            "path": str(self.source),
            "file": str(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "levels": [
                {
                    "level": lv.index,
                    "height": lv.shape[0],
                    "width": lv.shape[1],
                    "downsample": round(lv.downsample, 4),
                    "tile_height": lv.tile[0],
                    "tile_width": lv.tile[1],
                    "mpp_y": None if lv.mpp is None else round(lv.mpp[0], 5),
                    "mpp_x": None if lv.mpp is None else round(lv.mpp[1], 5),
                }
                for lv in map(self.level_info, range(self.level_count))
            ],
            "associated_images": self.associated_images,
        }

    def close(self) -> None:
        self.cache.clear()
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self):
        return (_reopen, (self.source, self._mpp_override, self.backend, self.cache.max_bytes))

    def __repr__(self) -> str:
        h, w = self.level_shapes[0]
        mpp = f"{self.mpp:.4g} um/px" if self.mpp else "mpp unknown"
        return f"<Slide {self.source.name!r} {self.backend}/{self.vendor} {w}x{h}, {self.level_count} levels, {mpp}>"


class _LevelView:
    """A level as a numpy-like object that dask slices chunk by chunk."""

    def __init__(self, slide: Slide, level: int) -> None:
        self.slide, self.level = slide, level
        self.shape = (*slide.level_shapes[level], 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        ys, xs, cs = (*key, slice(None), slice(None), slice(None))[:3]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        if y1 <= y0 or x1 <= x0:
            return np.empty((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)[:, :, cs]
        return self.slide._read(self.level, y0, y1, x0, x1)[:, :, cs]


def _reopen(path: Path, mpp: float | None, backend: str, cache_bytes: int) -> Slide:
    """A worker reopens the file with the backend that read it here, so its pixels are the same."""
    from .open import open_slide

    return open_slide(path, mpp=mpp, backend=backend, cache_bytes=cache_bytes)


def _valid_mpp(path: Path, mpp: float) -> float:
    """A pixel size the user gives: a number a microscope can have (PLAUSIBLE_MPP), else SlideError.

    `--mpp 1e-9` on a PNG would make every later step ask for a tile grid of astronomic size.
    """
    try:
        value = plausible_mpp(float(mpp))
    except (TypeError, ValueError):
        value = None
    if value is None:  # not a number, not finite, or no microscope's
        lo, hi = PLAUSIBLE_MPP
        raise SlideError(path, f"pixel size {mpp!r} um/px is not a microscope's: give one from {lo:g} to {hi:g} um/px")
    return value
