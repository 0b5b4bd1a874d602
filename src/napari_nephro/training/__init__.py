"""Training and fine-tuning the glomerulus networks from annotations (no napari import).

torch is imported only when training is used, so `nephro` starts fast.
"""

from importlib import import_module

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


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
