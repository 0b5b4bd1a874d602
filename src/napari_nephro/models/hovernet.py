"""HoVer-Net post-processing: a nuclear probability map and horizontal-vertical distance maps to numbered nuclei.

A network of the HoVer-Net family (HoVer-Net, CellViT, our own small nuclei
model) predicts, per pixel, the probability of being nucleus and the horizontal
and vertical offset to its nucleus's centre of mass, each scaled to [-1, 1]
within the nucleus (`hv_targets`). Between two touching nuclei the offsets jump
from +1 to -1, so a large Sobel gradient marks where one nucleus ends and the
next begins; the foreground minus those borders gives one marker per nucleus,
and a marker-controlled watershed splits the foreground among them.

The steps and thresholds are those of HoVer-Net (Graham et al., Medical Image
Analysis 2019) as CellViT (Hörst et al., Medical Image Analysis 2024) runs them:
foreground at probability 0.5, components under 10 px dropped, both maps min-max
scaled over the tile, Sobel kernel 21 (11 at 20x), border where the scaled
gradient is at least 0.4, markers opened by a 5x5 ellipse and kept from 10 px
(3 px at 20x), watershed on the blurred inverse gradient. Written with numpy,
scipy and scikit-image only (no OpenCV, no torch): OpenCV's Sobel, 3x3 Gaussian
and elliptic opening are rebuilt here with the same kernels and borders.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np
from scipy import ndimage

from .instances import TileInstances


@dataclass(frozen=True)
class HoverParams:
    """The post-processing thresholds; `at_magnification` gives the published ones."""

    threshold: float = 0.5  # foreground probability
    min_blob: int = 10  # px: foreground components smaller than this are noise
    sobel_size: int = 21  # odd Sobel kernel size for the HV gradients
    marker_threshold: float = 0.4  # scaled gradient from which a pixel is a border between nuclei
    min_size: int = 10  # px: smallest marker, so the smallest nucleus found

    @classmethod
    def at_magnification(cls, magnification: float) -> HoverParams:
        """CellViT's values: 40x (0.25 um/px) kernel 21 and markers from 10 px; 20x kernel 11, markers from 3 px."""
        return cls() if magnification >= 30 else cls(sobel_size=11, min_size=3)


def hover_instances(
    foreground: np.ndarray,
    hv: np.ndarray,
    types: np.ndarray | None = None,
    *,
    params: HoverParams | None = None,
    **overrides,
) -> TileInstances:
    """Nuclei of one tile from its maps.

    foreground: (H, W) nuclear probability; hv: (2, H, W) horizontal (x) then
    vertical (y) offsets to the nucleus centre in [-1, 1]; types: optional
    (C, H, W) type probabilities with channel 0 the background. Each nucleus's
    type is the majority of the per-pixel most probable types inside it, the
    background not counted when any other type is present (as HoVer-Net does); a
    nucleus all of whose pixels vote background is dropped (as CellViT does).
    Classes come back 0-based over the types without the background (type map
    channel c is class c - 1); the score is the mean probability of the chosen
    type over the nucleus, or the mean foreground probability without `types`.
    `overrides` replace single fields of `params` (e.g. `min_size=5`).
    """
    params = HoverParams(**{**(params or HoverParams()).__dict__, **overrides})
    foreground = np.asarray(foreground, np.float32)
    hv = np.asarray(hv, np.float32)
    if foreground.ndim != 2 or hv.shape != (2, *foreground.shape):
        raise ValueError(f"foreground (H, W) and hv (2, H, W) expected, not {foreground.shape} and {hv.shape}")
    if types is not None and (types.ndim != 3 or types.shape[1:] != foreground.shape or types.shape[0] < 2):
        raise ValueError(f"types (C >= 2, H, W) expected, not {types.shape}")
    labels = hover_labels(foreground, hv, params)
    count = int(labels.max())
    if count == 0:
        return TileInstances.from_labels(labels)
    if types is None:
        scores = _mean_per_label(foreground, labels, count)
        return TileInstances.from_labels(labels, np.zeros(count + 1, np.int64), scores)
    chosen, scores = _vote_types(np.asarray(types, np.float32), labels, count)
    dropped = chosen == 0
    dropped[0] = False
    if dropped.any():
        labels = np.where(dropped[labels], 0, labels)
    return TileInstances.from_labels(labels, np.maximum(chosen - 1, 0), scores)


def hover_labels(foreground: np.ndarray, hv: np.ndarray, params: HoverParams | None = None) -> np.ndarray:
    """(H, W) int32 instance ids (not consecutive) by marker-controlled watershed on the HV gradients."""
    from skimage.segmentation import watershed

    p = params or HoverParams()
    blob = foreground >= p.threshold
    blob = _drop_small(ndimage.label(blob)[0], p.min_blob) > 0
    if not blob.any():
        return np.zeros(foreground.shape, np.int32)
    h = _minmax(hv[0].astype(np.float64))
    v = _minmax(hv[1].astype(np.float64))
    sobel_h = 1.0 - _minmax(sobel(h, axis=1, size=p.sobel_size))
    sobel_v = 1.0 - _minmax(sobel(v, axis=0, size=p.sobel_size))
    border = np.maximum(sobel_h, sobel_v) - (1.0 - blob)
    border[border < 0] = 0
    basins = -_blur3(((1.0 - border) * blob).astype(np.float32))
    markers = blob & ~(border >= p.marker_threshold)
    markers = ndimage.binary_fill_holes(markers)
    markers = _open_ellipse5(markers)
    markers = _drop_small(ndimage.label(markers)[0], p.min_size)
    return watershed(basins, markers=markers, mask=blob).astype(np.int32)


def hv_targets(labels: np.ndarray) -> np.ndarray:
    """(2, H, W) float32 training targets for a label image: horizontal then vertical offset to the centre.

    For every pixel of instance i, x - cx_i and y - cy_i with (cy_i, cx_i) its exact
    centre of mass; the negative side is divided by its largest magnitude and the
    positive side by its largest value, each per instance, so both reach -1 and
    +1 at the instance's extremes (HoVer-Net's scaling) and 0 is the centre.
    Background is 0. Unlike HoVer-Net's reference code the centre is not rounded
    to a pixel first, so a symmetric instance gets a symmetric map.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"a (H, W) label image expected, not shape {labels.shape}")
    out = np.zeros((2, *labels.shape), np.float32)
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if ids.size == 0:
        return out
    inside = labels != 0
    lut = np.zeros(int(labels.max()) + 1, np.int64)
    lut[ids] = np.arange(1, ids.size + 1)
    dense = lut[labels[inside]]  # 1..n per foreground pixel
    ys, xs = np.nonzero(inside)
    counts = np.bincount(dense, minlength=ids.size + 1).astype(np.float64)
    counts[0] = 1.0
    for channel, coords in ((0, xs), (1, ys)):
        centre = np.bincount(dense, weights=coords, minlength=ids.size + 1) / counts
        offset = coords - centre[dense]
        low = np.zeros(ids.size + 1)
        high = np.zeros(ids.size + 1)
        np.minimum.at(low, dense, offset)
        np.maximum.at(high, dense, offset)
        scale = np.where(offset < 0, -low[dense], high[dense])
        out[channel][inside] = np.divide(offset, scale, out=np.zeros_like(offset), where=scale > 0)
    return out


def sobel(image: np.ndarray, axis: int, size: int) -> np.ndarray:
    """OpenCV's Sobel first derivative along `axis` (1: x, 0: y) with an odd `size`, mirrored borders.

    The derivative kernel is a binomial row of length size - 1 differenced once,
    the cross kernel the binomial row of length `size`, as `cv2.getDerivKernels`.
    """
    if size % 2 == 0 or size < 3:
        raise ValueError(f"Sobel size must be odd and at least 3, not {size}")
    smooth = np.array([comb(size - 1, i) for i in range(size)], np.float64)
    derivative = np.convolve([comb(size - 2, i) for i in range(size - 1)], [-1.0, 1.0])
    out = ndimage.correlate1d(image, derivative, axis=axis, mode="mirror")
    return ndimage.correlate1d(out, smooth, axis=1 - axis, mode="mirror")


def _blur3(image: np.ndarray) -> np.ndarray:
    """OpenCV's 3x3 Gaussian with sigma 0: the kernel (1, 2, 1) / 4 both ways, mirrored borders."""
    kernel = np.array([0.25, 0.5, 0.25], image.dtype)
    out = ndimage.correlate1d(image, kernel, axis=0, mode="mirror")
    return ndimage.correlate1d(out, kernel, axis=1, mode="mirror")


_ELLIPSE5 = np.array(
    [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], bool
)  # cv2.getStructuringElement(MORPH_ELLIPSE, (5, 5))


def _open_ellipse5(mask: np.ndarray) -> np.ndarray:
    """Opening as OpenCV does it: the image edge neither erodes (outside counts as set) nor dilates."""
    eroded = ndimage.binary_erosion(mask, _ELLIPSE5, border_value=1)
    return ndimage.binary_dilation(eroded, _ELLIPSE5, border_value=0)


def _minmax(image: np.ndarray) -> np.ndarray:
    """Scaled to [0, 1] over the whole tile (cv2.normalize NORM_MINMAX); a flat image becomes 0."""
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros_like(image)
    return (image - low) / (high - low)


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labelled components with fewer than `min_size` pixels set to 0 (in place)."""
    if min_size > 0 and labels.max() > 0:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        labels[small[labels]] = 0
    return labels


def _mean_per_label(values: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Mean of `values` per id 0..count (index = id)."""
    sums = np.bincount(labels.ravel(), weights=values.ravel(), minlength=count + 1)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    return (sums / np.maximum(sizes, 1)).astype(np.float32)


def _vote_types(types: np.ndarray, labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per id 0..count: the majority type channel (background only if nothing else voted) and its mean probability."""
    channels = types.shape[0]
    winner = types.argmax(axis=0)
    flat = labels.ravel().astype(np.int64)
    votes = np.bincount(flat * channels + winner.ravel(), minlength=(count + 1) * channels)
    votes = votes.reshape(count + 1, channels)
    others = votes[:, 1:]
    chosen = np.where(others.max(axis=1) > 0, others.argmax(axis=1) + 1, 0)
    picked = types.reshape(channels, -1)[chosen[flat], np.arange(flat.size)]
    scores = _mean_per_label(picked.reshape(labels.shape), labels, count)
    return chosen, np.clip(scores, 0.0, 1.0)
