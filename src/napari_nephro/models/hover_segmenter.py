"""Our own nuclei networks (checkpoint folders with `heads: hover`) as instance segmenters.

The shipped one, `nuclei` (`models/default_nuclei/`), runs offline on a CPU; a
folder written by `nephro train --task nuclei` is loaded the same way
(`nuclei:FOLDER`). The network gives the nuclear probability and the HV maps;
HoVer-Net's post-processing (`hovernet.hover_instances`, shared with CellViT)
makes them nuclei, with the thresholds of the working scale.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import CONFIG, WEIGHTS, load_checkpoint
from .config import ModelConfig
from .device import pick_device
from .errors import ModelError
from .hovernet import HoverParams, hover_instances
from .instances import TileInstances

DEFAULT_NUCLEI = "nuclei"  # the CLI name of the shipped model
DEFAULT_NUCLEI_FOLDER = Path(__file__).with_name("default_nuclei")
OPTIONS = ("tile_size", "overlap", "batch_size", "threshold")
# measured on a 2-core CPU (benchmarks/eval_nuclei.py): network + post-processing per megapixel at 0.5 um/px
CPU_SECONDS_PER_MEGAPIXEL = 1.3  # of tiles at 0.5 um/px, end to end: 32 tiles of 512 px in 10.8 s


MIN_PIXELS = 256  # percentiles of fewer non-white pixels than this (or 1 % of the tile) are taken over all
MAX_GAIN = 4.0  # a flat tile (glass, pale stroma) is stretched at most this much: noise must not become nuclei


def stretch_contrast(x: torch.Tensor, percentiles: list[float] | tuple[float, float]) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1], each channel of each tile mapped so its percentiles span 0 to 1.

    Why: nuclei slides differ most in contrast, not in colour. Pale or hazy scans (as
    in NuInsSeg) put every nucleus outside what crisp training images taught; after
    a per-tile stretch both look alike. The gain is bounded by MAX_GAIN; pure white
    pixels (padding past the slide's edge, saturated glass) are left out of the
    percentiles. The same is
    done to every training crop (`training.nuclei_loop`), so the network only ever
    sees stretched tiles.
    """
    low, high = (float(p) / 100 for p in percentiles)
    flat = x.flatten(2)  # (N, 3, H * W)
    levels = torch.tensor([low, high], dtype=x.dtype, device=x.device)
    q = torch.stack([torch.quantile(_not_white(t), levels, dim=1) for t in flat])
    lo, hi = q[:, 0], q[:, 1]  # (N, 3)
    span = (hi - lo).clamp_min(1 / MAX_GAIN)
    return ((x - lo[..., None, None]) / span[..., None, None]).clamp_(0, 1)


def _not_white(pixels: torch.Tensor) -> torch.Tensor:
    """(3, P) -> the pixels that are not pure white, when there are enough of them to take percentiles of.

    Why: the engine pads a tile that reaches past the slide's edge with white, and
    a small image (a 512 px crop at 0.25 um/px is a quarter of a 512 px tile at
    0.5 um/px) is mostly padding; its 99th percentile would be that white, not the
    tissue's brightest, and the tissue would be stretched less than in training.
    """
    keep = (pixels < 1.0).any(dim=0)
    if int(keep.sum()) < max(MIN_PIXELS, pixels.shape[1] // 100):
        return pixels
    return pixels[:, keep]


def normalise(x: torch.Tensor, normalization: dict, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Float RGB in [0, 1] -> the network's input: the optional stretch, then mean and std."""
    if normalization.get("stretch"):
        x = stretch_contrast(x, normalization["stretch"])
    return (x - mean) / std


def post_processing(mpp: float, tuned: dict | None = None) -> HoverParams:
    """HoVer-Net's thresholds for the working scale (the 40x ones up to 0.375 um/px, the 20x ones beyond),
    with those a checkpoint tuned on its validation images (`config.post_processing`) in their place."""
    published = HoverParams.at_magnification(10 / mpp)
    if not tuned:
        return published
    whole = {"min_blob", "min_size", "sobel_size"}
    return HoverParams(**{**published.__dict__, **{k: int(v) if k in whole else float(v) for k, v in tuned.items()}})


def find_folder(path: str | os.PathLike[str] | None) -> Path:
    """The shipped model for None (or `nuclei`), else the given checkpoint folder."""
    if path is None or str(path) == DEFAULT_NUCLEI:
        if not (DEFAULT_NUCLEI_FOLDER / WEIGHTS).is_file():
            raise ModelError("the shipped nuclei model is missing from this installation: reinstall napari-nephro")
        return DEFAULT_NUCLEI_FOLDER
    folder = Path(path)
    if not (folder / CONFIG).is_file():
        raise ModelError(
            f"{folder}: not a nuclei checkpoint folder (no {CONFIG}); train one with nephro train --task nuclei"
        )
    return folder


class HoverSegmenter:
    """A hover checkpoint as the instance engine sees it: RGB tiles in, nuclei out."""

    kind = "instance"
    cpu_seconds_per_megapixel = CPU_SECONDS_PER_MEGAPIXEL

    def __init__(
        self,
        network: torch.nn.Module,
        config: ModelConfig,
        *,
        device: torch.device | str = "cpu",
        fingerprint: str = "",
        tile_size: int | None = None,
        overlap: int | None = None,
        batch_size: int | None = None,
        threshold: float | None = None,
    ) -> None:
        if config.heads != "hover":
            raise ModelError("this checkpoint segments glomeruli (a class map), not nuclei: use it with --model FOLDER")
        self.device = torch.device(device)
        self.network = network.eval().to(self.device)
        if self.device.type == "cpu":  # about 15 % faster convolutions on a CPU, same outputs
            self.network = self.network.to(memory_format=torch.channels_last)
        self.config = config
        self.classes = list(config.classes)
        self.mpp = config.mpp
        self.tile_size = _whole("tile_size", config.tile_size if tile_size is None else tile_size)
        self.overlap = _whole("overlap", config.overlap if overlap is None else overlap)
        if self.tile_size < 64 or not 0 <= self.overlap < self.tile_size:
            raise ModelError(f"the tile must be 64 px or more and the overlap in [0, tile), not {tile_size}, {overlap}")
        default_batch = 4 if self.device.type != "cpu" else 1
        self.batch_size = default_batch if batch_size is None else _whole("batch_size", batch_size)
        if self.batch_size < 1:
            raise ModelError(f"batch_size must be at least 1, not {batch_size}")
        self.tiles_per_call = self.batch_size
        self.licence = str(config.provenance.get("licence", ""))  # the training data's terms, told before a run
        hover = post_processing(config.mpp, config.post_processing)
        if threshold is not None:
            if not 0 < float(threshold) < 1:
                raise ModelError(f"the probability threshold must be between 0 and 1, not {threshold}")
            hover = HoverParams(**{**hover.__dict__, "threshold": float(threshold)})
        self.hover = hover
        self.fingerprint = hashlib.sha256(
            f"{fingerprint}:{self.tile_size}:{self.overlap}:{hover}".encode()
        ).hexdigest()[:16]
        norm = config.normalization
        self._mean = torch.tensor(norm["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(norm["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def predict_maps(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, 3) uint8 -> nuclear probability (N, H, W) and HV maps (N, 2, H, W); sides padded to 32."""
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise ValueError(f"tiles must be (N, H, W, 3) uint8 RGB, not {tiles.shape} {tiles.dtype}")
        n, h, w = tiles.shape[:3]
        ph, pw = -h % 32, -w % 32
        probs, hvs = [], []
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(tiles[start : start + self.batch_size])).to(self.device)
                x = normalise(
                    x.permute(0, 3, 1, 2).float().div_(255.0), self.config.normalization, self._mean, self._std
                )
                if ph or pw:
                    x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
                if self.device.type == "cpu":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
                    out = self.network(x).float()
                probs.append(torch.sigmoid(out[:, 0, :h, :w]).cpu().numpy())
                hvs.append(out[:, 1:3, :h, :w].cpu().numpy())
        return np.concatenate(probs), np.concatenate(hvs)

    def predict_instances(self, tiles: np.ndarray) -> list[TileInstances]:
        """(N, T, T, 3) uint8 RGB -> one TileInstances per tile."""
        probs, hvs = self.predict_maps(tiles)
        return [hover_instances(p, hv, params=self.hover) for p, hv in zip(probs, hvs, strict=True)]


def _whole(name: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ModelError(f"{name} must be a whole number, not {value!r}") from None
    if number != value:
        raise ModelError(f"{name} must be a whole number, not {value!r}")
    return number


def load(path: str | os.PathLike[str] | None = None, *, device: str = "auto", **options) -> HoverSegmenter:
    """Our nuclei model: the shipped one for None, or a checkpoint folder from `nephro train --task nuclei`.

    options: tile_size, overlap (px at the model's mpp), batch_size, threshold (nuclear probability, 0.5).
    """
    from .segmenter import checkpoint_fingerprint

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ModelError(f"unknown nuclei-model option(s) {', '.join(unknown)}: valid ones are {', '.join(OPTIONS)}")
    folder = find_folder(path)
    config = ModelConfig.from_file(folder / CONFIG)
    if config.heads != "hover":
        raise ModelError(f"{folder}: a glomerulus checkpoint, not a nuclei model: give it as --model {folder}")
    target = pick_device(device)
    network, config = load_checkpoint(folder, target)
    return HoverSegmenter(network, config, device=target, fingerprint=checkpoint_fingerprint(folder), **options)
