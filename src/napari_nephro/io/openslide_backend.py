"""Vendor formats through OpenSlide: SVS, NDPI, MRXS, SCN, BIF, VMS, Philips TIFF, DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backend import WHITE, check_geometry, mpp_pair, parse_float, plausible_mpp, to_rgb
from .errors import SlideError

# Formats OpenSlide reads better than tifffile would. Plain "generic-tiff" is left
# to the tifffile backend, which also understands OME and SubIFD pyramids.
VENDOR_FORMATS = {"aperio", "hamamatsu", "mirax", "leica", "ventana", "philips", "dicom", "sakura", "synthetic"}
DEFAULT_TILE = 512  # for formats that do not report a tile size


def detect_vendor(path: Path) -> str | None:
    """OpenSlide's name for the file's format, or None if OpenSlide does not know it."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # OpenSlide raises on unreadable files; that just means "not mine"
        return None


class OpenSlideBackend:
    name = "openslide"

    def __init__(self, path: Path, *, check_tiles: bool = True) -> None:
        """`check_tiles=False` skips the decode test, for TIFF files already checked whole."""
        import openslide

        self.path = path
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(path, "not a slide format OpenSlide can read") from None
        except openslide.OpenSlideError as exc:
            hint = ""
            if "No pyramid levels" in str(exc) and detect_vendor(path) == "dicom":
                hint = ": a DICOM WSI needs its volume (pyramid) files in the same folder"
            raise SlideError(path, f"OpenSlide cannot open it ({exc}){hint}") from None
        try:
            self._describe()
            check_geometry(path, self.level_shapes, self.tile_shapes)  # before any tile is read
            if check_tiles:
                self._check_readable()
        except BaseException:  # a refused file must not stay open
            self._slide.close()
            raise

    def _describe(self) -> None:
        props = dict(self._slide.properties)
        self.properties = props
        self.vendor = props.get("openslide.vendor")
        self.level_shapes = [(h, w) for w, h in self._slide.level_dimensions]
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        self.tile_shapes = [
            (
                int(props.get(f"openslide.level[{i}].tile-height", DEFAULT_TILE)),
                int(props.get(f"openslide.level[{i}].tile-width", DEFAULT_TILE)),
            )
            for i in range(len(self.level_shapes))
        ]
        mpp_x = plausible_mpp(parse_float(props.get("openslide.mpp-x")))
        mpp_y = plausible_mpp(parse_float(props.get("openslide.mpp-y")))
        self.mpp_yx = mpp_pair(mpp_y, mpp_x)
        self.objective_power = parse_float(props.get("openslide.objective-power"))
        self._background = _colour(props.get("openslide.background-color"))
        self.associated_names = sorted(self._slide.associated_images.keys())

    def _check_readable(self) -> None:
        """Decode the last tile of the finest and coarsest levels.

        A truncated file often still has a readable header; its missing tiles
        would only fail later, one by one, while the user pans. The last tiles are
        the likeliest to be missing, so test them now and refuse the file early.
        TIFF-based files get the cheaper `verify_tiff` instead.
        """
        for level in {0, len(self.level_shapes) - 1}:
            h, w = self.level_shapes[level]
            th, tw = self.tile_shapes[level]
            self.read_tile(level, (h - 1) // th, (w - 1) // tw)

    def read_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        import openslide

        h, w = self.level_shapes[level]
        th, tw = self.tile_shapes[level]
        y, x = ty * th, tx * tw
        size = (min(tw, w - x), min(th, h - y))
        ds = self.level_downsamples[level]
        # read_region takes level-0 coordinates; rounding keeps tiles aligned at
        # integer downsamples and within half a level-0 pixel otherwise.
        location = (round(x * ds), round(y * ds))
        try:
            image = self._slide.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            raise SlideError(self.path, f"cannot read level {level} at x={x}, y={y} ({exc})") from None
        return to_rgb(np.asarray(image), self._background)

    def read_associated(self, name: str) -> np.ndarray:
        return to_rgb(np.asarray(self._slide.associated_images[name]), self._background)

    def close(self) -> None:
        self._slide.close()


def _colour(hex_rgb: str | None) -> tuple[int, int, int]:
    """The slide's background colour ("RRGGBB"), white when absent or malformed."""
    try:
        return tuple(int(hex_rgb[i : i + 2], 16) for i in (0, 2, 4)) if hex_rgb and len(hex_rgb) == 6 else WHITE
    except ValueError:
        return WHITE
