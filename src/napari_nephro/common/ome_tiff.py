"""One RGB picture as a small pyramidal OME-TIFF: what the sample slides are written as.

Tiled JPEG levels in SubIFDs (2x reductions, box-averaged) with the pixel size in
both the OME-XML and the resolution tags, as a scanner's OME-TIFF export has them,
so the reader's tifffile path (tiles, levels, micrometres) is what opens them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_output


def write_ome_pyramid(
    path: Path,
    image: np.ndarray,
    *,
    mpp: float,
    levels: int,
    tile: int = 256,
    name: str,
    description: str | None = None,
    associated: dict[str, np.ndarray] | None = None,
    quality: int = 90,
) -> Path:
    """Write `image` (h, w, 3) uint8 and `levels - 1` halvings to `path`, atomically (a reader never sees
    half a file), making its folder when needed.

    `associated` images (e.g. {"label": ...}) follow as separate, untiled series.
    """
    import tifffile

    res = 1e4 / mpp  # pixels per centimetre
    options = {
        "tile": (tile, tile),
        "compression": "jpeg",
        "compressionargs": {"level": quality},
        "photometric": "rgb",
        "subsampling": (1, 1),  # full colour resolution: stains differ in fine colour detail
        "resolutionunit": "CENTIMETER",
    }
    meta = {
        "Name": name,
        "axes": "YXS",
        "PhysicalSizeX": mpp,
        "PhysicalSizeY": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeYUnit": "µm",
    }
    if description:
        meta["Description"] = description
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, tifffile.TiffWriter(tmp, ome=True) as tif:
        tif.write(image, subifds=levels - 1, resolution=(res, res), metadata=meta, **options)
        level = image
        for i in range(1, levels):
            level = halve(level)
            tif.write(level, subfiletype=1, resolution=(res / 2**i, res / 2**i), **options)
        for label, picture in (associated or {}).items():
            tif.write(picture, photometric="rgb", metadata={"Name": label, "axes": "YXS"})
    return path


def halve(image: np.ndarray) -> np.ndarray:
    """A 2x box-averaged reduction of an (h, w, 3) uint8 image (an odd last row or column is dropped)."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16)
    return (blocks.sum(axis=(1, 3)) // 4).astype(np.uint8)
