"""What a checkpoint folder's `config.json` says: architecture, classes, scale, normalisation, provenance.

The engine needs the scale (mpp, tile and input size) as much as the weights: a
network trained at 1 um/px on 1024 px tiles resized to 320 px must see the same.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ModelError

ARCHITECTURES = ("unet", "unet3plus", "swin_unet")
DEFAULT_ENCODERS = {"unet": "resnet34", "unet3plus": "resnet34", "swin_unet": "tu-swin_tiny_patch4_window7_224"}
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
CONFIG_VERSION = 1


@dataclass
class ModelConfig:
    """Everything needed to rebuild a network and feed it tiles the way it was trained."""

    arch: str
    classes: list[str] = field(default_factory=lambda: ["glomerulus"])
    encoder: str | None = None
    mpp: float = 1.0  # micrometres per pixel of the tiles the network was trained on (before resizing)
    tile_size: int = 1024  # tile side at `mpp`
    overlap: int = 256
    input_size: int = 320  # the network's input side: tiles are resized to it
    normalization: dict = field(default_factory=lambda: dict(IMAGENET))
    encoder_kwargs: dict = field(default_factory=dict)  # e.g. a small Swin for tests: embed_dim, depths, num_heads
    decoder: dict = field(default_factory=dict)  # e.g. U-Net 3+ cat_channels, deep_supervision
    provenance: dict = field(default_factory=dict)  # how it was made: data, recipe, metrics, licence
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ModelError(f"unknown architecture {self.arch!r}: choose one of {', '.join(ARCHITECTURES)}")
        self.encoder = self.encoder or DEFAULT_ENCODERS[self.arch]
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ModelError(f"classes must be distinct names, at least one, not {self.classes!r}")
        for name in ("tile_size", "input_size"):
            if int(getattr(self, name)) <= 0:
                raise ModelError(f"{name} must be positive, not {getattr(self, name)}")
        if not 0 <= self.overlap < self.tile_size:
            raise ModelError(f"overlap must be in [0, tile_size), not {self.overlap}")
        if not self.mpp or self.mpp <= 0:
            raise ModelError(f"mpp must be positive, not {self.mpp}")
        if self.input_size % 32:  # five stride-2 stages in every encoder of the family
            raise ModelError(f"the network input size must be a multiple of 32, not {self.input_size}")

    @property
    def out_channels(self) -> int:
        """One foreground channel (sigmoid) for one class, else background + classes (softmax)."""
        return 1 if len(self.classes) == 1 else len(self.classes) + 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{path.parent}: not a checkpoint folder (no config.json)") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ModelError(f"{path}: expected a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"{path}: unknown keys {', '.join(unknown)} (written by a newer napari-nephro?)")
        if "arch" not in data:
            raise ModelError(f"{path}: no 'arch' (one of {', '.join(ARCHITECTURES)})")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ModelError(f"{path}: {exc}") from None
