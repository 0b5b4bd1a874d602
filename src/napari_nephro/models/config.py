"""What a checkpoint folder's `config.json` says: architecture, classes, scale, normalisation, provenance.

The engine needs the scale (mpp, tile and input size) as much as the weights: a
network trained at 1 um/px on 1024 px tiles resized to 320 px must see the same.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..common.limits import MAX_TILE, MIN_TILE  # the tile side and mpp limits every command that lays tiles keeps
from ..common.limits import WORK_MPP as MPP_RANGE
from .errors import ModelError
from .object_rules import ObjectRules

ARCHITECTURES = ("unet", "unet3plus", "swin_unet")
DEFAULT_ENCODERS = {"unet": "resnet34", "unet3plus": "resnet34", "swin_unet": "tu-swin_tiny_patch4_window7_224"}
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
CONFIG_VERSION = 1
HEADS = ("semantic", "hover")  # a class map, or HoVer-Net's nuclear probability + horizontal-vertical maps
# sizes beyond these are mistakes, and would ask for tens of GiB at segment time
MAX_INPUT = 4096  # network input side
MAX_DEPTH = 64  # nesting of a config.json's lists and objects (provenance holds a few levels)


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
    objects: dict | None = None  # rules that make the pixel map whole objects (see ObjectRules); None: none
    flips: bool = False  # average the predictions of the tile and its three flips (4x the time, smoother outlines)
    heads: str = "semantic"  # "hover": a nuclei network (probability + HV maps) the instance engine runs
    # hover only: HoVer-Net post-processing thresholds tuned on validation images, over the published ones
    post_processing: dict | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or self.arch not in ARCHITECTURES:
            raise ModelError(f"unknown architecture {self.arch!r}: choose one of {', '.join(ARCHITECTURES)}")
        if self.encoder is not None and not isinstance(self.encoder, str):
            raise ModelError(f"encoder must be a name, not {self.encoder!r}")
        self.encoder = self.encoder or DEFAULT_ENCODERS[self.arch]
        if (
            not isinstance(self.classes, (list, tuple))
            or not all(isinstance(c, str) and c for c in self.classes)
            or not self.classes
            or len(set(self.classes)) != len(self.classes)
        ):
            raise ModelError(f"classes must be distinct names, at least one, not {_short(self.classes)}")
        self.classes = list(self.classes)
        self.tile_size = _integer("tile_size", self.tile_size)
        self.overlap = _integer("overlap", self.overlap)
        self.input_size = _integer("input_size", self.input_size)
        self.version = _integer("version", self.version)
        if self.tile_size <= 0:
            raise ModelError(f"tile_size must be positive, not {self.tile_size}")
        if not MIN_TILE <= self.tile_size <= MAX_TILE:
            raise ModelError(f"tile_size must be between {MIN_TILE} and {MAX_TILE} px, not {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise ModelError(f"overlap must be in [0, tile_size), not {self.overlap}")
        if self.input_size <= 0:
            raise ModelError(f"input_size must be positive, not {self.input_size}")
        if self.input_size % 32 or self.input_size > MAX_INPUT:  # five stride-2 stages in every encoder
            raise ModelError(
                f"the network input size must be a multiple of 32 up to {MAX_INPUT}, not {self.input_size}"
            )
        if isinstance(self.mpp, bool) or not isinstance(self.mpp, (int, float)) or not self.mpp > 0:
            raise ModelError(f"mpp must be positive, not {_short(self.mpp)}")
        self.mpp = float(self.mpp)
        if not MPP_RANGE[0] <= self.mpp <= MPP_RANGE[1]:
            raise ModelError(
                f"mpp must be between {MPP_RANGE[0]} and {MPP_RANGE[1]} micrometres per pixel, not {self.mpp}"
            )
        if self.heads not in HEADS:
            raise ModelError(f"heads must be one of {', '.join(HEADS)}, not {_short(self.heads)}")
        if self.heads == "hover" and len(self.classes) != 1:
            raise ModelError(f"a hover network finds one class of object, not {len(self.classes)}")
        if self.post_processing is not None:
            if self.heads != "hover":
                raise ModelError("post_processing is for hover (nuclei) networks only")
            _check_post_processing(self.post_processing)
        if not isinstance(self.flips, bool):
            raise ModelError(f"flips must be true or false, not {_short(self.flips)}")
        for name in ("normalization", "encoder_kwargs", "decoder", "provenance"):
            if not isinstance(getattr(self, name), dict):
                raise ModelError(f"{name} must be a JSON object, not {_short(getattr(self, name))}")
        _check_normalization(self.normalization)
        self.objects = None if (rules := self.object_rules()) is None else rules.to_config()
        if self.version > CONFIG_VERSION:
            raise ModelError(
                f"config version {self.version} is newer than this napari-nephro reads ({CONFIG_VERSION}): "
                "update napari-nephro"
            )
        if self.version < 1:
            raise ModelError(f"config version must be 1 or more, not {self.version}")

    def object_rules(self) -> ObjectRules | None:
        """The `objects` entry as `ObjectRules` (validated), or None."""
        return ObjectRules.from_config(self.objects)

    @property
    def out_channels(self) -> int:
        """One foreground channel (sigmoid) for one class, else background + classes (softmax); hover: 3."""
        if self.heads == "hover":
            return 3  # nuclear probability logit, horizontal and vertical offsets
        return 1 if len(self.classes) == 1 else len(self.classes) + 1

    def to_json(self) -> str:
        data = asdict(self)
        for key, off in (("objects", None), ("flips", False), ("heads", "semantic"), ("post_processing", None)):
            if data[key] == off:  # left out, so an older napari-nephro still reads the file
                del data[key]
        return json.dumps(data, indent=2)

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{path.parent}: not a checkpoint folder (no config.json)") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path}: not valid JSON ({exc})") from None
        except OSError as exc:  # a folder named config.json, no permission
            raise ModelError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        except RecursionError:
            raise ModelError(
                f"{path}: not a checkpoint config (JSON nested more than {MAX_DEPTH} levels deep)"
            ) from None
        if not isinstance(data, dict):
            raise ModelError(f"{path}: expected a JSON object")
        if _too_deep(data, MAX_DEPTH):  # copying or writing it again would overflow Python's stack
            raise ModelError(f"{path}: not a checkpoint config (JSON nested more than {MAX_DEPTH} levels deep)")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"{path}: unknown keys {', '.join(unknown)} (written by a newer napari-nephro?)")
        if "arch" not in data:
            raise ModelError(f"{path}: no 'arch' (one of {', '.join(ARCHITECTURES)})")
        try:
            return cls(**data)
        except (TypeError, ValueError, ModelError) as exc:
            raise ModelError(f"{path}: {exc}") from None


def _too_deep(data: object, limit: int) -> bool:
    """Whether lists and objects nest more than `limit` levels (counted without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _integer(name: str, value: object) -> int:
    """A whole number (3 or 3.0), never a bool, a string or 3.5."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise ModelError(f"{name} must be a whole number, not {_short(value)}")
    return int(value)


def _check_normalization(norm: dict) -> None:
    for key in ("mean", "std"):
        values = norm.get(key)
        if (
            not isinstance(values, list)
            or len(values) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        ):
            raise ModelError(f"normalization {key} must be three numbers (R, G, B), not {_short(values)}")
    if not all(v > 0 for v in norm["std"]):
        raise ModelError(f"normalization std must be positive, not {norm['std']}")
    stretch = norm.get("stretch")  # per-tile contrast stretch between two percentiles (nuclei models)
    if stretch is not None and not (
        isinstance(stretch, list)
        and len(stretch) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in stretch)
        and 0 <= stretch[0] < stretch[1] <= 100
    ):
        raise ModelError(
            f"normalization stretch must be two percentiles, low < high in [0, 100], not {_short(stretch)}"
        )
    unknown = sorted(set(norm) - {"mean", "std", "stretch"})
    if unknown:
        raise ModelError(f"unknown normalization keys {', '.join(map(str, unknown))}")


# HoverParams' fields: (whole number?, low, high), bounds inclusive
POST_PROCESSING = {
    "threshold": (False, 0.0, 1.0),
    "marker_threshold": (False, 0.0, 1.0),
    "min_blob": (True, 0, 10_000),
    "min_size": (True, 0, 10_000),
    "sobel_size": (True, 3, 63),
}


def _check_post_processing(values: object) -> None:
    if not isinstance(values, dict):
        raise ModelError(f"post_processing must be a JSON object, not {_short(values)}")
    unknown = sorted(set(values) - set(POST_PROCESSING))
    if unknown:
        raise ModelError(
            f"unknown post_processing keys {', '.join(map(str, unknown))}: valid ones are {', '.join(POST_PROCESSING)}"
        )
    for key, value in values.items():
        whole, low, high = POST_PROCESSING[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelError(f"post_processing {key} must be a number, not {_short(value)}")
        if whole and value != int(value):
            raise ModelError(f"post_processing {key} must be a whole number, not {_short(value)}")
        if not low <= value <= high or (key == "sobel_size" and int(value) % 2 == 0):
            odd = " and odd" if key == "sobel_size" else ""
            raise ModelError(f"post_processing {key} must be in [{low}, {high}]{odd}, not {_short(value)}")
