"""A synthetic H&E-like slide, written as a pyramidal OME-TIFF: a format sample, not tissue.

Tests and benchmarks of the reader's pyramid path (tifffile backend, tiles, SubIFD
levels, pixel size, an associated label image) use it where any picture will do and
its size must be chosen. The picture is made of noise and discs: tissue in eosin
pink, nuclei in haematoxylin purple, and a few glomerulus-like tufts with a pale
Bowman space. Users get real kidney tissue instead (`sample.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common.ome_tiff import write_ome_pyramid

SYNTHETIC_MPP = 0.5  # micrometres per pixel at level 0 (a 20x scan)
SYNTHETIC_SHAPE = (4096, 6144)  # level 0 (height, width): 2 x 3 mm
SYNTHETIC_LEVELS = 4  # level 0 and three 2x reductions
SYNTHETIC_TILE = 256


def write_synthetic_slide(path: Path, shape: tuple[int, int] = SYNTHETIC_SHAPE, seed: int = 0) -> Path:
    """Write the synthetic slide to `path` atomically (a reader never sees half a file)."""
    image = synthetic_he(shape, seed)
    write_ome_pyramid(
        path,
        image,
        mpp=SYNTHETIC_MPP,
        levels=SYNTHETIC_LEVELS,
        tile=SYNTHETIC_TILE,
        name="synthetic kidney",
        associated={"label": _label_image()},
    )
    return path


def synthetic_he(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """An (h, w, 3) uint8 picture that looks, from afar, like an H&E kidney section."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    h, w = shape
    small = (h // 32, w // 32)
    # Tissue: smoothed noise, thresholded into a few irregular fragments.
    field = ndimage.gaussian_filter(rng.standard_normal(small), 6)
    level = np.quantile(field, 0.45)
    tissue_small = field > level
    tissue = ndimage.zoom(field.astype(np.float32), (h / small[0], w / small[1]), order=1)[:h, :w] > level
    # Nuclei: random dots grown into discs of about 7 px (3.5 um) radius.
    nuclei = np.zeros(shape, bool)
    count = h * w // 900
    nuclei[rng.integers(0, h, count), rng.integers(0, w, count)] = True
    yy, xx = np.mgrid[-7:8, -7:8]
    nuclei = ndimage.binary_dilation(nuclei, structure=(yy**2 + xx**2) <= 36) & tissue
    # Glomeruli: discs of 150-220 um with a pale ring (Bowman space) around a dense tuft.
    glom_tuft = np.zeros(shape, bool)
    glom_ring = np.zeros(shape, bool)
    ys, xs = np.nonzero(tissue_small)
    for k in rng.choice(len(ys), size=min(12, len(ys)), replace=False):
        cy, cx = ys[k] * 32 + 16, xs[k] * 32 + 16
        r = rng.uniform(150, 220) / 2 / SYNTHETIC_MPP
        y0, y1, x0, x1 = (
            max(0, int(cy - r - 30)),
            min(h, int(cy + r + 30)),
            max(0, int(cx - r - 30)),
            min(w, int(cx + r + 30)),
        )
        d2 = (np.arange(y0, y1)[:, None] - cy) ** 2 + (np.arange(x0, x1)[None, :] - cx) ** 2
        glom_tuft[y0:y1, x0:x1] |= d2 <= (0.85 * r) ** 2
        glom_ring[y0:y1, x0:x1] |= (d2 <= r**2) & (d2 > (0.85 * r) ** 2)
    tuft_nuclei = glom_tuft & (rng.random(shape, dtype=np.float32) < 0.006)
    tuft_nuclei = ndimage.binary_dilation(tuft_nuclei, structure=(yy**2 + xx**2) <= 20)

    image = np.empty((h, w, 3), np.uint8)
    image[:] = (244, 242, 246)  # glass
    image[tissue] = (232, 160, 196)  # eosin
    image[glom_ring] = (246, 226, 236)
    image[glom_tuft] = (222, 138, 190)
    image[nuclei & ~glom_ring] = (96, 62, 146)  # haematoxylin
    image[tuft_nuclei] = (86, 54, 140)
    grain = rng.integers(-10, 11, size=(h, w, 1), dtype=np.int16)
    return np.clip(image.astype(np.int16) + grain, 0, 255).astype(np.uint8)


def _label_image() -> np.ndarray:
    label = np.full((200, 400, 3), 255, np.uint8)
    label[20:180, 20:60] = (30, 30, 30)  # a "barcode"
    label[20:180, 70:80] = (30, 30, 30)
    return label
