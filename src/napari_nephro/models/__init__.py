"""Segmentation models: the `Segmenter` protocol, the U-Net family of the BMC Nephrology paper, SegGPT, and the
nuclei families (Cellpose, StarDist, CellViT) behind the `InstanceSegmenter` protocol.

Checkpoints are folders (`config.json` + `model.safetensors`); nothing is unpickled.
Nothing here imports napari, and torch is imported only when a network is needed,
so `nephro` starts fast.
"""

from ..common.lazy import lazy_attributes
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
    "SegGptSegmenter": "seggpt",
    "load_seggpt": "seggpt",
    "InstanceSegmenter": "instances",
    "TileInstances": "instances",
    "load_nuclei_model": "nuclei",
    "CellViTSegmenter": "cellvit",
    "hover_instances": "hovernet",
    "hv_targets": "hovernet",
}

__all__ = ["ARCHITECTURES", "ModelConfig", "ModelError", *_LAZY]

__getattr__ = lazy_attributes(__name__, _LAZY)
