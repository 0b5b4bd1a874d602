"""Class-wise weighted oversampling, so a few hard patches are not drowned by many easy ones.

Hörst et al., "CellViT: Vision Transformers for precise cell segmentation and
classification", Medical Image Analysis 94 (2024) 103143, sample each training
image with a weight set by its class (there: its tissue type; the CellViT code's
`get_sampling_weights_tissue`). For a sample of class c,

    w_c = N / (gamma * N_c + (1 - gamma) * N)

with N the number of samples and N_c those of class c. gamma = 0 weighs every
sample 1 (the data as it is); gamma = 1 gives w_c = N / N_c, so every class is
drawn equally often. Guo et al. fine-tune on easy + hard with gamma = 0.85; here
the classes are the sets, "easy" and "hard".
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .layout import ReviewError

GAMMA = 0.85


def oversampling_weights(groups: list[str], gamma: float = GAMMA) -> np.ndarray:
    """The sampling weight of each sample from its class (`groups[i]`): N / (gamma N_c + (1 - gamma) N)."""
    if not (isinstance(gamma, int | float) and 0 <= gamma <= 1):
        raise ReviewError(f"gamma must be between 0 (no oversampling) and 1 (balanced classes), not {gamma!r}")
    n = len(groups)
    counts = Counter(groups)
    weight = {c: n / (gamma * k + (1 - gamma) * n) for c, k in counts.items()}
    return np.array([weight[g] for g in groups], dtype=np.float64)
