"""Generic pyramidal TIFF and OME-TIFF through tifffile, decoding the file's own tiles."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .backend import mpp_pair, parse_float, plausible_mpp, to_rgb
from .errors import SlideError
from .tiff_check import check_complete, quiet_tifffile

STRIP_CHUNK_ROWS = 256  # stripped images are read in bands of at least this many rows

_UNIT_TO_UM = {"um": 1.0, "µm": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "pm": 1e-6}


class TiffBackend:
    name = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile

        self.path = path
        with quiet_tifffile() as warnings:
            try:
                self._tif = tifffile.TiffFile(str(path))
            except (tifffile.TiffFileError, ValueError, OSError) as exc:
                raise SlideError(path, f"not a readable TIFF ({exc})") from None
            try:
                check_complete(self._tif, path, warnings)
                self._describe(path)
            except BaseException:  # a refused file must not stay open
                self._tif.close()
                raise
        # Tiles and associated images are read from many threads through one file
        # position: one (reentrant) file-handle lock, the one tifffile's own reads take, guards both.
        self._tif.filehandle.set_lock(True)

    def _describe(self, path: Path) -> None:
        series = max(self._tif.series, key=lambda s: math.prod(s.shape))
        self._levels = [_Level(lvl, path) for lvl in series.levels]
        self.vendor = series.kind or None
        self.level_shapes = [lvl.shape for lvl in self._levels]
        h0, w0 = self.level_shapes[0]
        self.level_downsamples = [(h0 / h + w0 / w) / 2 for h, w in self.level_shapes]
        self.tile_shapes = [lvl.tile for lvl in self._levels]
        self.properties = _properties(self._tif, series)
        self.mpp_yx, self.objective_power = _physical(self._tif, self._tif.series.index(series))
        self._associated = {
            (s.name or f"image{i}").strip().lower() or f"image{i}": s
            for i, s in enumerate(self._tif.series)
            if s is not series and s.dtype == np.uint8 and s.axes == "YXS" and s.shape[-1] in (3, 4)
        }
        self.associated_names = sorted(self._associated)

    def read_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        lvl = self._levels[level]
        fh = self._tif.filehandle
        out = []
        for index in lvl.segments(ty, tx):
            offset, count = lvl.page.dataoffsets[index], lvl.page.databytecounts[index]
            data = None
            if count:
                with fh.lock:  # one file position, many reading threads
                    fh.seek(offset)
                    data = fh.read(count)
            try:
                segment, _, shape = lvl.decode(data, index, jpegtables=lvl.keyframe.jpegtables)
            except Exception as exc:  # codec errors come in many types
                raise SlideError(self.path, f"cannot decode level {level} tile {index} ({exc})") from None
            if segment is None:  # sparse file: a tile that was never written
                segment = np.full(shape, 255, np.uint8)
            out.append(segment.reshape(segment.shape[-3:]))
        tile = out[0] if len(out) == 1 else np.concatenate(out, axis=0)
        h, w = lvl.shape
        th, tw = lvl.tile
        tile = tile[: min(th, h - ty * th), : min(tw, w - tx * tw)]
        return to_rgb(lvl.photometric_fix(tile))

    def read_associated(self, name: str) -> np.ndarray:
        with self._tif.filehandle.lock:  # tifffile also seeks while loading pages, outside its own lock
            return to_rgb(self._associated[name].asarray())

    def close(self) -> None:
        self._tif.close()


class _Level:
    """Where one level's tiles (or bands of strips) lie in the file."""

    def __init__(self, series, path: Path) -> None:
        from tifffile import PHOTOMETRIC, PLANARCONFIG

        self.keyframe = series.keyframe
        page = series.pages[0]
        self.page = page
        axes, shape = series.axes, series.shape
        rgb = axes == "YXS" and shape[-1] in (3, 4)
        gray = axes == "YX"
        if series.dtype != np.uint8 or not (rgb or gray):
            raise SlideError(
                path,
                f"not a brightfield RGB image (axes {axes}, shape {shape}, {series.dtype}); "
                "napari-nephro reads RGB slides only: open multichannel or fluorescence "
                "images with napari's own reader",
            )
        if rgb and self.keyframe.planarconfig == PLANARCONFIG.SEPARATE:
            raise SlideError(path, "RGB stored as separate planes is not supported; re-save it as a tiled RGB TIFF")
        self._invert = gray and self.keyframe.photometric == PHOTOMETRIC.MINISWHITE
        self.shape = (int(shape[0]), int(shape[1]))
        self.decode = self.keyframe.decode
        if self.keyframe.is_tiled:
            self.tile = (self.keyframe.tilelength, self.keyframe.tilewidth)
            self._per_tile = 1
        else:
            rows = max(1, min(self.keyframe.rowsperstrip or self.shape[0], self.shape[0]))
            self._per_tile = max(1, math.ceil(STRIP_CHUNK_ROWS / rows))
            self.tile = (min(rows * self._per_tile, self.shape[0]), self.shape[1])
        self._tiles_across = math.ceil(self.shape[1] / self.tile[1])
        self._rows = self.tile[0] // self._per_tile

    def segments(self, ty: int, tx: int) -> range:
        """Indices into the page's offsets of the segments that make tile (ty, tx)."""
        if self.keyframe.is_tiled:
            return range(ty * self._tiles_across + tx, ty * self._tiles_across + tx + 1)
        first = ty * self._per_tile
        last = min(first + self._per_tile, math.ceil(self.shape[0] / self._rows))
        return range(first, last)

    def photometric_fix(self, tile: np.ndarray) -> np.ndarray:
        return 255 - tile if self._invert else tile


def _properties(tif, series) -> dict[str, str]:
    page = tif.pages.first
    props = {"tifffile.series": series.kind or "", "tifffile.compression": page.compression.name}
    for tag in ("ImageDescription", "Software", "Make", "Model", "DateTime", "Artist"):
        value = page.tags.valueof(tag)
        if isinstance(value, str) and value.strip():
            props[f"tiff.{tag}"] = value.strip()[:2000]
    return props


def _physical(tif, series_index: int) -> tuple[tuple[float, float] | None, float | None]:
    """Level-0 micrometres per pixel (y, x) and objective power, when the file says."""
    if tif.is_ome and tif.ome_metadata:
        found = _ome_physical(tif.ome_metadata, series_index)
        if found[0] is not None:
            return found
    page = tif.pages.first
    unit_um = {2: 25400.0, 3: 10000.0}.get(int(page.resolutionunit))  # inch, centimetre
    if unit_um is None:
        return None, None
    res_x, res_y = page.resolution
    mpp_x = plausible_mpp(unit_um / res_x) if res_x else None
    mpp_y = plausible_mpp(unit_um / res_y) if res_y else None
    return mpp_pair(mpp_y, mpp_x), None


def _ome_physical(xml: str, series_index: int) -> tuple[tuple[float, float] | None, float | None]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    images = [el for el in root if el.tag.endswith("}Image")]
    if not images:
        return None, None
    image = images[min(series_index, len(images) - 1)]
    pixels = next((el for el in image if el.tag.endswith("}Pixels")), None)
    mpp = None
    if pixels is not None:
        sizes = []
        for axis in ("Y", "X"):
            value = pixels.get(f"PhysicalSize{axis}")
            factor = _UNIT_TO_UM.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
            size = parse_float(value)
            sizes.append(plausible_mpp(size * factor) if size and factor else None)
        mpp = mpp_pair(*sizes)
    power = None
    for el in root.iter():
        if el.tag.endswith("}Objective") and el.get("NominalMagnification"):
            power = parse_float(el.get("NominalMagnification"))
            break
    return mpp, power
