"""The TP/FP/FN map of the papers' figures: 1 = TP (green), 2 = FP (yellow), 3 = FN (red)."""

from __future__ import annotations

import dask.array as da
import numpy as np

TP, FP, FN = 1, 2, 3
TPFPFN_COLORS = {TP: (0, 200, 0), FP: (255, 220, 0), FN: (230, 0, 0)}


def tp_fp_fn_map(pred, truth):
    """uint8 map of agreement per pixel; lazy (dask) in, lazy out."""
    if tuple(pred.shape) != tuple(truth.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground-truth shape {tuple(truth.shape)}")
    if isinstance(pred, da.Array) or isinstance(truth, da.Array):
        p = da.asarray(pred)
        return da.map_blocks(_block, p, da.asarray(truth).rechunk(p.chunks), dtype=np.uint8)
    return _block(np.asarray(pred), np.asarray(truth))


def _block(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    p, t = pred != 0, truth != 0
    out = np.zeros(p.shape, np.uint8)
    out[p & t] = TP
    out[p & ~t] = FP
    out[~p & t] = FN
    return out
