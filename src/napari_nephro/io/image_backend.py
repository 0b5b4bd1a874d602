"""Plain PNG / JPEG / BMP images as a one-level slide, decoded once on first read."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .backend import mpp_pair, plausible_mpp, to_rgb
from .errors import SlideError

CHUNK = 1024  # these files have no tiles; napari gets chunks of this size
_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr"}


class ImageBackend:
    name = "image"

    def __init__(self, path: Path) -> None:
        from PIL import Image, UnidentifiedImageError

        self.path = path
        try:
            with Image.open(path) as image:  # reads the header only
                mode, (w, h), info, fmt = image.mode, image.size, dict(image.info), image.format
        except Image.DecompressionBombError:
            raise SlideError(
                path,
                f"larger than Pillow decodes safely ({Image.MAX_IMAGE_PIXELS * 2 / 1e6:.0f} MP): "
                "save it as a tiled pyramidal TIFF (e.g. vips tiffsave IN OUT.tif --tile --pyramid)",
            ) from None
        except (UnidentifiedImageError, OSError) as exc:
            raise SlideError(path, f"not a readable image ({exc})") from None
        if mode not in _MODES:
            raise SlideError(
                path, f"not a brightfield RGB image (PIL mode {mode}); napari-nephro reads 8-bit RGB images only"
            )
        self.vendor = fmt
        self.level_shapes = [(h, w)]
        self.level_downsamples = [1.0]
        self.tile_shapes = [(min(CHUNK, h), min(CHUNK, w))]
        dpi = info.get("dpi")
        mpp = [plausible_mpp(25400.0 / float(d)) if d else None for d in dpi[::-1]] if dpi else [None, None]
        self.mpp_yx = mpp_pair(*mpp)
        self.objective_power = None
        self.properties = {
            f"image.{k}": str(v)[:200] for k, v in info.items() if isinstance(v, str | int | float | tuple)
        }
        self.properties["image.format"] = str(fmt)
        self.associated_names: list[str] = []
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    def _decoded(self) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                from PIL import Image

                try:
                    with Image.open(self.path) as image:
                        if image.mode not in ("RGB", "RGBA", "L"):
                            image = image.convert(
                                "RGBA" if "A" in image.mode or "transparency" in image.info else "RGB"
                            )
                        self._pixels = to_rgb(np.asarray(image))
                except OSError as exc:
                    raise SlideError(self.path, f"cannot decode the image ({exc})") from None
            return self._pixels

    def read_tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        th, tw = self.tile_shapes[0]
        return self._decoded()[ty * th : (ty + 1) * th, tx * tw : (tx + 1) * tw]

    def read_associated(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def close(self) -> None:
        self._pixels = None
