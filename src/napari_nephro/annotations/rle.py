"""COCO run-length encoding (column-major runs, starting with background), plain and compressed."""

from __future__ import annotations

import numpy as np


def rle_decode(rle: dict) -> np.ndarray:
    """{"size": [h, w], "counts": list or compressed string} -> (h, w) bool mask."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str | bytes):
        counts = _string_to_counts(counts.decode() if isinstance(counts, bytes) else counts)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("RLE runs must be a list of non-negative counts")
    if counts.sum() != h * w:  # checked before allocating: a wrong size must not cost a huge mask
        raise ValueError(f"RLE runs cover {counts.sum()} pixels, the mask has {h * w}")
    flat = np.repeat(np.arange(counts.size) % 2 == 1, counts)  # runs alternate background, foreground
    return flat.reshape((w, h)).T


def rle_encode(mask: np.ndarray) -> dict:
    """(h, w) mask -> {"size": [h, w], "counts": compressed string}, byte-identical to pycocotools."""
    h, w = mask.shape
    flat = np.asarray(mask, bool).T.ravel()
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [h, w], "counts": _counts_to_string(counts)}


def _string_to_counts(s: str) -> list[int]:
    counts: list[int] = []
    i = 0
    while i < len(s):
        x, k, more = 0, 0, True
        while more:
            if i == len(s):
                raise ValueError("truncated RLE string")
            c = ord(s[i]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _counts_to_string(counts: list[int]) -> str:
    out = []
    for i, value in enumerate(counts):
        x = value - counts[i - 2] if i > 2 else value
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = not (((c & 0x10) == 0 and x == 0) or ((c & 0x10) != 0 and x == -1))
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)
