"""Training and fine-tuning the glomerulus networks from annotations (no napari import)."""

from .data import TileSet, cut_tiles, map_classes, split_by_group
from .errors import TrainingError
from .loop import Epoch, Recipe, Step, TrainResult, train

__all__ = [
    "Epoch",
    "Recipe",
    "Step",
    "TileSet",
    "TrainResult",
    "TrainingError",
    "cut_tiles",
    "map_classes",
    "split_by_group",
    "train",
]
