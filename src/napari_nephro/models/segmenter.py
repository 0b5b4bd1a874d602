"""The `Segmenter` protocol the tiled engine talks to, and its PyTorch implementation for our checkpoints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CONFIG, WEIGHTS, load_checkpoint, resolve_checkpoint
from .config import ModelConfig
from .device import pick_device
from .errors import ModelError


class Segmenter(Protocol):
    """What the engine needs to know of a model, whatever its library."""

    kind: Literal["semantic", "instance"]
    classes: list[str]
    mpp: float  # micrometres per pixel the model expects its tiles at
    tile_size: int  # tile side at `mpp`
    input_size: int  # network input side (tiles are resized to it)
    overlap: int  # default overlap between tiles at `mpp`
    fingerprint: str  # identifies the weights, so a resumed run can check it is the same model

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """(N, tile, tile, 3) uint8 RGB -> (N, C, tile, tile) float32 probabilities."""
        ...


class TorchSegmenter:
    """A U-Net-family network and its config: resize, normalise, infer, give probabilities back at tile size.

    One class gives one sigmoid channel (foreground); several give softmax channels
    (background first, then the classes in config order).
    """

    kind: Literal["semantic"] = "semantic"

    def __init__(
        self, network: nn.Module, config: ModelConfig, device: torch.device | str = "cpu", fingerprint: str = ""
    ) -> None:
        self.network, self.config, self.device = network.eval(), config, torch.device(device)
        self.network.to(self.device)
        self.classes, self.mpp = list(config.classes), config.mpp
        self.tile_size, self.input_size, self.overlap = config.tile_size, config.input_size, config.overlap
        # what a resumed run checks it is still the same model: the checkpoint's bytes, else the config
        self.fingerprint = fingerprint or hashlib.sha256(config.to_json().encode()).hexdigest()[:16]
        self.objects = config.object_rules()  # how its pixel map becomes objects; None: kept as it is
        norm = config.normalization
        self._mean = torch.tensor(norm["mean"], dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
        self._std = torch.tensor(norm["std"], dtype=torch.float32).view(1, 3, 1, 1).to(self.device)

    @classmethod
    def from_checkpoint(cls, folder: str | os.PathLike[str], device: str = "auto") -> TorchSegmenter:
        """Load a checkpoint folder, or the shipped model by the name `default`."""
        folder = resolve_checkpoint(folder)
        target = pick_device(device)
        network, config = load_checkpoint(folder, target)
        if config.heads == "hover":
            raise ModelError(f"{folder}: a nuclei model: segment with it as --model nuclei:{folder}")
        return cls(network, config, target, checkpoint_fingerprint(folder))

    @torch.inference_mode()
    def predict(self, tiles: np.ndarray) -> np.ndarray:
        if tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"tiles must be (N, H, W, 3) RGB, not {tiles.shape}")
        size = tiles.shape[1:3]
        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device).permute(0, 3, 1, 2).float() / 255
        if size != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
            )
        x = (x - self._mean) / self._std
        probs = self._probabilities(x)
        if self.config.flips:  # the mean over the tile and its flips: what one view misses, another may see
            for dims in ((-1,), (-2,), (-2, -1)):
                probs += self._probabilities(x.flip(dims)).flip(dims)
            probs /= 4
        if probs.shape[-2:] != size:
            probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        return probs.cpu().numpy()

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            logits = self.network(x)
        logits = logits.float()
        return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def checkpoint_fingerprint(folder: str | os.PathLike[str]) -> str:
    """A short hash of a checkpoint's config and weights: the same model, byte for byte."""
    digest = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        with open(Path(folder) / name, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]
