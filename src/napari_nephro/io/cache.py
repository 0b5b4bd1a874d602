"""A byte-bounded LRU cache of decoded tiles, shared by every level of one slide."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np

DEFAULT_CACHE_BYTES = 256 * 2**20


class TileCache:
    """Least-recently-used decoded tiles, bounded by their total size in bytes.

    Decoding a JPEG or JPEG 2000 tile costs far more than a dictionary look-up, and
    napari asks for the same tiles again on every pan and zoom. Thread safe: napari
    and dask read tiles from several threads. Two threads missing the same tile at
    once may both decode it; that costs time, never correctness.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._tiles: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_load(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
                self.hits += 1
                return tile
            self.misses += 1
        tile = load()
        tile.setflags(write=False)  # shared between callers: nobody may change it
        self._put(key, tile)
        return tile

    def _put(self, key: Hashable, tile: np.ndarray) -> None:
        if tile.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._tiles.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._tiles[key] = tile
            self._bytes += tile.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._tiles.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._tiles.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._tiles)
