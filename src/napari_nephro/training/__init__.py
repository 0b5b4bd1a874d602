"""Training and fine-tuning the glomerulus networks from annotations (no napari import).

torch is imported only when training is used, so `nephro` starts fast.
"""

from ..common.lazy import lazy_attributes
from .errors import TrainingError

_LAZY = {
    "TileSet": "data",
    "cut_tiles": "data",
    "map_classes": "data",
    "split_by_group": "data",
    "Epoch": "loop",
    "Recipe": "loop",
    "Step": "loop",
    "TrainResult": "loop",
    "train": "loop",
}

__all__ = ["TrainingError", *_LAZY]

__getattr__ = lazy_attributes(__name__, _LAZY)
