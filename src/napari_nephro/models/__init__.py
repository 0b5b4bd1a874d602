"""Segmentation models: the `Segmenter` protocol and the U-Net family of the BMC Nephrology paper.

Checkpoints are folders (`config.json` + `model.safetensors`); nothing is unpickled.
Nothing here imports napari, and torch is imported only when a network is needed,
so `nephro` starts fast.
"""

from importlib import import_module

from .config import ARCHITECTURES, ModelConfig
from .errors import ModelError

_LAZY = {
    "DEVICES": "device",
    "pick_device": "device",
    "build_network": "networks",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "resolve_checkpoint": "checkpoint",
    "DEFAULT": "checkpoint",
    "Segmenter": "segmenter",
    "TorchSegmenter": "segmenter",
}

__all__ = ["ARCHITECTURES", "ModelConfig", "ModelError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
