"""Generic pyramidal TIFF and OME-TIFF through tifffile, decoding the file's own tiles."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .backend import check_geometry, mpp_pair, parse_float, plausible_mpp, to_rgb
from .errors import SlideError
from .tiff_check import check_complete, quiet_tifffile

STRIP_CHUNK_ROWS = 256  # stripped images are read in bands of at least this many rows...
STRIP_BAND_PIXELS = 2**24  # ...unless that would make a band larger than this (one strip at least)

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
        check_geometry(path, self.level_shapes, self.tile_shapes, [lvl.unit for lvl in self._levels])
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
        h, w = lvl.shape
        th, tw = lvl.tile
        y0, x0 = ty * th, tx * tw
        rows, cols = min(th, h - y0), min(tw, w - x0)
        if lvl.raw:
            tile = self._read_raw_rows(lvl, level, y0, y0 + rows)
        else:
            tile = np.full((rows, cols, lvl.samples), 255, np.uint8)  # what a sparse file leaves unwritten
            for index, plane, y in lvl.segments(ty, tx):
                segment = self._decode(lvl, level, index)
                if segment is None:
                    continue
                n = min(segment.shape[0], rows - y)
                part = segment[:n, :cols]
                if lvl.separate:
                    tile[y : y + n, :, plane] = part[..., 0]
                else:
                    tile[y : y + n] = part
        return to_rgb(lvl.photometric_fix(tile))

    def _decode(self, lvl: _Level, level: int, index: int) -> np.ndarray | None:
        """Segment `index` of a level's page as (rows, cols, samples), or None where the file has none."""
        offset, count = lvl.page.dataoffsets[index], lvl.page.databytecounts[index]
        if not count:  # sparse file: a segment that was never written
            return None
        fh = self._tif.filehandle
        with fh.lock:  # one file position, many reading threads
            fh.seek(offset)
            data = fh.read(count)
        try:
            segment, _, _ = lvl.decode(data, index, jpegtables=lvl.keyframe.jpegtables)
        except Exception as exc:  # codec errors come in many types
            raise SlideError(self.path, f"cannot decode level {level} segment {index} ({exc})") from None
        return None if segment is None else segment.reshape(segment.shape[-3:])

    def _read_raw_rows(self, lvl: _Level, level: int, y0: int, y1: int) -> np.ndarray:
        """Rows [y0, y1) of an uncompressed stripped level, straight from the file: a strip, however
        tall (many writers store a whole image as one), is never read whole."""
        rps, w, samples = lvl.rows_per_strip, lvl.shape[1], lvl.samples
        per_pixel = 1 if lvl.separate else samples
        row_bytes = w * per_pixel
        out = np.full((y1 - y0, w, samples), 255, np.uint8)
        fh = self._tif.filehandle
        for plane in range(lvl.planes):
            for strip in range(y0 // rps, (y1 - 1) // rps + 1):
                index = plane * lvl.strips + strip
                top = strip * rps
                a, b = max(y0, top), min(y1, top + rps)
                count = lvl.page.databytecounts[index]
                if not count:
                    continue  # sparse: never written
                needed = (min(top + rps, lvl.shape[0]) - top) * row_bytes
                if count < needed:
                    raise SlideError(
                        self.path,
                        f"cannot read level {level} strip {index}: it holds {count} bytes, its rows need {needed}",
                    )
                with fh.lock:
                    fh.seek(lvl.page.dataoffsets[index] + (a - top) * row_bytes)
                    data = fh.read((b - a) * row_bytes)
                if len(data) != (b - a) * row_bytes:
                    raise SlideError(self.path, f"cannot read level {level} strip {index}: the file ends inside it")
                rows = np.frombuffer(data, np.uint8).reshape(b - a, w, per_pixel)
                if lvl.separate:
                    out[a - y0 : b - y0, :, plane] = rows[..., 0]
                else:
                    out[a - y0 : b - y0] = rows
        return out

    def read_associated(self, name: str) -> np.ndarray:
        with self._tif.filehandle.lock:  # tifffile also seeks while loading pages, outside its own lock
            return to_rgb(self._associated[name].asarray())

    def close(self) -> None:
        self._tif.close()


class _Level:
    """Where one level's tiles (or bands of strips) lie in the file.

    A tiled level's tiles are the file's own. A stripped level is read in bands of whole
    strips, at least STRIP_CHUNK_ROWS rows and at most STRIP_BAND_PIXELS pixels (but never
    less than one strip), or, uncompressed, in bands of rows read straight from the file. With
    planar configuration SEPARATE the page's segments are one run per sample plane
    (all of plane 0's tiles or strips, then plane 1's...), and a tile is assembled from one
    segment of each run.
    """

    def __init__(self, series, path: Path) -> None:
        from tifffile import COMPRESSION, PHOTOMETRIC, PLANARCONFIG

        self.keyframe = key = series.keyframe
        self.page = series.pages[0]
        axes, shape = series.axes, tuple(int(n) for n in series.shape)
        self.separate = key.planarconfig == PLANARCONFIG.SEPARATE and key.samplesperpixel > 1
        rgb = (axes == "YXS" and shape[-1] in (3, 4) and not self.separate) or (
            self.separate and len(shape) == 3 and shape[0] == key.samplesperpixel in (3, 4)
        )
        gray = axes == "YX"
        if series.dtype != np.uint8 or not (rgb or gray):
            raise SlideError(
                path,
                f"not a brightfield RGB image (axes {axes}, shape {shape}, {series.dtype}); "
                "napari-nephro reads RGB slides only: open multichannel or fluorescence "
                "images with napari's own reader",
            )
        self.samples = 1 if gray else key.samplesperpixel
        self.planes = self.samples if self.separate else 1
        self._invert = gray and key.photometric == PHOTOMETRIC.MINISWHITE
        self.shape = (shape[1], shape[2]) if self.separate else (shape[0], shape[1])
        h, w = self.shape
        if h < 1 or w < 1:
            raise SlideError(path, f"has an empty image ({w} x {h} pixels)")
        self.decode = key.decode
        self.raw = False
        if key.is_tiled:
            self.tile = (int(key.tilelength), int(key.tilewidth))
            if min(self.tile) < 1:
                raise SlideError(path, f"is damaged: it declares tiles of {self.tile[1]} x {self.tile[0]} pixels")
            self._across = math.ceil(w / self.tile[1])
            self._per_plane = math.ceil(h / self.tile[0]) * self._across
            self.unit = "tiles"
        else:
            rps = int(key.rowsperstrip or h)
            self.rows_per_strip = rps = max(1, min(rps, h))
            self.strips = math.ceil(h / rps)  # per sample plane
            self.raw = (
                key.compression == COMPRESSION.NONE
                and key.bitspersample == 8
                and key.photometric in (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.MINISWHITE, PHOTOMETRIC.RGB)
            )
            if self.raw:  # any band of rows can be read directly
                band = max(1, min(STRIP_CHUNK_ROWS, STRIP_BAND_PIXELS // w))
            else:  # whole strips only: each is decoded whole
                self._per_tile = max(1, min(math.ceil(STRIP_CHUNK_ROWS / rps), STRIP_BAND_PIXELS // (rps * w)))
                band = rps * self._per_tile
            self.tile = (min(band, h), w)  # holds one strip at least: the limit on tiles bounds strips too
            self.unit = "bands of rows" if self.raw else "strips"
        expected = self._per_plane if key.is_tiled else self.strips
        found = len(self.page.dataoffsets)
        if found < expected * self.planes:
            raise SlideError(
                path, f"is damaged: a level of {w} x {h} pixels has {found} segments, it needs {expected * self.planes}"
            )

    def segments(self, ty: int, tx: int) -> list[tuple[int, int, int]]:
        """(index into the page's offsets, sample plane, first row within the tile) of each segment
        that makes tile (ty, tx); compressed levels only."""
        planes = range(self.planes)
        if self.keyframe.is_tiled:
            return [(p * self._per_plane + ty * self._across + tx, p, 0) for p in planes]
        first = ty * self._per_tile
        last = min(first + self._per_tile, self.strips)
        rps = self.rows_per_strip
        return [(p * self.strips + k, p, (k - first) * rps) for p in planes for k in range(first, last)]

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
