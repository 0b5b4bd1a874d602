"""The classic Cellpose network (Cellpose 1-3: `nuclei`, `cyto3`, `cyto2`, `cyto`), ours, so its files load without
Cellpose 3.

Cellpose 4 (Cellpose-SAM) refuses the classic models and no longer ships their
network, and Cellpose 3 cannot be installed next to numpy >= 2.1; yet the classic
U-Net is what most published kidney work used. It is written here from the
architecture and the module names of Cellpose 3's `resnet_torch.CPnet`, so a
published file loads strictly:

- encoder (`downsample.down.res_down_{i}`): residual blocks of four
  batch-norm / ReLU / 3x3 convolutions with a 1x1 projection, 2x2 max pooling
  between levels; widths nbase = [2, 32, 64, 128, 256] (2 input channels);
- style: the deepest features averaged over the image and scaled to unit length
  (256 numbers), added through a linear layer (`full`) before three of the four
  convolutions of every decoder block (`upsample.up.res_up_{i}`);
- decoder: nearest 2x upsampling, the skip features added (not concatenated);
- output: batch norm, ReLU, 1x1 convolution to 3 maps, dY, dX (5 x the unit
  flow towards the cell's centre) and the cell probability logit;
- `diam_mean` (the object diameter, px, training images were rescaled to: 17 for
  `nuclei`, 30 for the others) and `diam_labels` stored as 1-element tensors.

About 6.6 M parameters. Inference follows Cellpose 3: the grayscale image (mean of
R, G, B) normalised so its 1st and 99th percentiles become 0 and 1, a zero second
channel, the network run on 224 px blocks overlapping by 10 % of the image and
blended with a window that falls off over the blocks' last 20 px. Masks come from
the flows with the installed Cellpose's own dynamics (`cellpose_adapter`).
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError

NBASE = (2, 32, 64, 128, 256)  # input channels, then the encoder's widths
NOUT = 3  # dY, dX, cell probability
KERNEL = 3
BLOCK = 224  # Cellpose 3's test-time block side
BLOCK_OVERLAP = 0.1  # fraction of the image by which blocks overlap (cellpose's tile_overlap)
PAD_MULTIPLE = 16  # cellpose pads 8 px around the image and up to a multiple of 16
OPTIONAL_KEYS = ("diam_mean", "diam_labels")  # files from before Cellpose 2 lack them: the model's known values stand
BN_EPS, BN_MOMENTUM = 1e-5, 0.05


def _bn_relu_conv(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """Pre-activation convolution: keys `.0` (batch norm) and `.2` (convolution)."""
    return nn.Sequential(
        nn.BatchNorm2d(cin, eps=BN_EPS, momentum=BN_MOMENTUM),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2),
    )


def _bn_conv(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """The residual projection: keys `.0` (batch norm) and `.1` (convolution), no activation."""
    return nn.Sequential(
        nn.BatchNorm2d(cin, eps=BN_EPS, momentum=BN_MOMENTUM), nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    )


class ResidualDown(nn.Module):
    """Two residual pairs of convolutions; the first changes the width, so its shortcut is projected."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Sequential()  # registered before `proj`: the published files list the keys in this order
        for i in range(4):
            self.conv.add_module(f"conv_{i}", _bn_relu_conv(cin if i == 0 else cout, cout, kernel))
        self.proj = _bn_conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x) + self.conv[1](self.conv[0](x))
        return x + self.conv[3](self.conv[2](x))


class Encoder(nn.Module):
    """One `ResidualDown` per level, max pooling before every level but the first; all levels are returned."""

    def __init__(self, nbase: Sequence[int], kernel: int) -> None:
        super().__init__()
        self.down = nn.Sequential()
        for i in range(len(nbase) - 1):
            self.down.add_module(f"res_down_{i}", ResidualDown(nbase[i], nbase[i + 1], kernel))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2, stride=2))
            features.append(x)
        return features


class StyleConv(nn.Module):
    """A convolution whose input gets the style vector (through `full`) and optionally a skip map added."""

    def __init__(self, channels: int, style: int, kernel: int) -> None:
        super().__init__()
        self.conv = _bn_relu_conv(channels, channels, kernel)
        self.full = nn.Linear(style, channels)

    def forward(self, style: torch.Tensor, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + skip
        return self.conv(x + self.full(style)[:, :, None, None])


class ResidualUp(nn.Module):
    """The decoder's block: a plain convolution, then three style convolutions, the skip added at the second."""

    def __init__(self, cin: int, cout: int, style: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv_0", _bn_relu_conv(cin, cout, kernel))
        for i in (1, 2, 3):
            self.conv.add_module(f"conv_{i}", StyleConv(cout, style, kernel))
        self.proj = _bn_conv(cin, cout, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        x = self.proj(x) + self.conv[1](style, self.conv[0](x), skip)
        return x + self.conv[3](style, self.conv[2](style, x))


class Decoder(nn.Module):
    """From the deepest level up: block i takes width widths[i + 1] to widths[i]; the deepest block keeps it."""

    def __init__(self, widths: Sequence[int], kernel: int) -> None:
        super().__init__()
        self.up = nn.Sequential()
        for i in range(len(widths) - 1):
            self.up.add_module(f"res_up_{i}", ResidualUp(widths[i + 1], widths[i], widths[-1], kernel))

    def forward(self, style: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.up[-1](features[-1], features[-1], style)
        for i in range(len(self.up) - 2, -1, -1):
            x = self.up[i](F.interpolate(x, scale_factor=2, mode="nearest"), features[i], style)
        return x


class CellposeNet(nn.Module):
    """The classic Cellpose U-Net: (B, nbase[0], H, W) normalised image -> (B, 3, H, W) flows + logit, style.

    H and W must be multiples of 2 ** (levels - 1) (8 for the published nets).
    """

    def __init__(self, nbase: Sequence[int] = NBASE, nout: int = NOUT, kernel: int = KERNEL, diam_mean: float = 30.0):
        super().__init__()
        self.nbase, self.nout, self.kernel = tuple(int(n) for n in nbase), int(nout), int(kernel)
        widths = [*self.nbase[1:], self.nbase[-1]]  # the deepest decoder block keeps the deepest width
        self.downsample = Encoder(self.nbase, kernel)
        self.upsample = Decoder(widths, kernel)
        self.output = _bn_relu_conv(widths[0], nout, 1)
        self.diam_mean = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)
        self.diam_labels = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.nbase) - 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.downsample(x)
        style = features[-1].mean(dim=(2, 3))
        style = style / style.pow(2).sum(dim=1, keepdim=True).sqrt()
        return self.output(self.upsample(style, features)), style


# ----------------------------------------------------------------------------------------------------- weights


def read_state_dict(path: Path, hint: str) -> dict[str, torch.Tensor]:
    """A Cellpose model file's state dict (tensors only), read without running anything it holds.

    `hint` ends the one-line error: where a good file comes from.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises many kinds for a file it cannot or must not read: all are one line
        lines = str(exc).strip().splitlines()
        detail = next((x.strip() for x in lines if "Unsupported global" in x), lines[0].strip() if lines else "")
        raise ModelError(
            f"{path}: not a Cellpose model file napari-nephro can read safely ({exc.__class__.__name__}: "
            f"{detail[:160]}); {hint}"
        ) from None
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{path}: not a Cellpose model file (it holds no dict of weights); {hint}")
    if all(str(k).startswith("module.") for k in data):  # saved from DataParallel
        data = {str(k)[7:]: v for k, v in data.items()}
    return data


def is_classic(state: dict[str, torch.Tensor]) -> bool:
    return "downsample.down.res_down_0.proj.1.weight" in state and "output.2.weight" in state


def config_of(state: dict[str, torch.Tensor], path: Path) -> tuple[tuple[int, ...], int, int]:
    """nbase, nout and kernel size read off the weights' shapes, so user-trained variants load too."""
    try:
        nbase = [int(state["downsample.down.res_down_0.proj.1.weight"].shape[1])]
        level = 0
        while f"downsample.down.res_down_{level}.proj.1.weight" in state:
            nbase.append(int(state[f"downsample.down.res_down_{level}.proj.1.weight"].shape[0]))
            level += 1
        nout = int(state["output.2.weight"].shape[0])
        kernel = int(state["downsample.down.res_down_0.conv.conv_0.2.weight"].shape[-1])
    except (KeyError, IndexError) as exc:
        raise ModelError(f"{path}: a classic Cellpose file without {exc}; it is damaged: download it again") from None
    if len(nbase) < 3 or nout != NOUT or kernel % 2 == 0:
        raise ModelError(f"{path}: a Cellpose-like net napari-nephro cannot run (nbase {nbase}, {nout} outputs)")
    return tuple(nbase), nout, kernel


def network_from_state(state: dict[str, torch.Tensor], path: Path, diam_mean: float) -> CellposeNet:
    """The network with the file's weights, every key of the file used and every weight of the net given.

    Only `diam_mean` / `diam_labels` may be absent (older files): they keep `diam_mean`.
    """
    nbase, nout, kernel = config_of(state, path)
    network = CellposeNet(nbase, nout, kernel, diam_mean=diam_mean)
    expected = network.state_dict()
    missing = [k for k in expected if k not in state and k not in OPTIONAL_KEYS and "num_batches_tracked" not in k]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        first = (
            f"{len(missing)} weights missing (e.g. {missing[0]})"
            if missing
            else f"{len(extra)} unexpected (e.g. {extra[0]})"
            if extra
            else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, not {tuple(expected[wrong[0]].shape)}"
        )
        raise ModelError(f"{path}: its weights do not fit the classic Cellpose net with nbase {list(nbase)}: {first}")
    full = {k: state.get(k, v) for k, v in expected.items()}
    network.load_state_dict(full, strict=True)
    return network.float().eval()


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """Identifies weights: every key, shape and value (the classic net is small enough to hash whole)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).float().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- inference


def normalise99(channel: np.ndarray) -> np.ndarray:
    """Cellpose's scaling: 1st percentile -> 0, 99th -> 1; a flat channel becomes zeros."""
    channel = channel.astype(np.float32, copy=True)
    lo, hi = np.percentile(channel, (1.0, 99.0))
    if hi - lo <= 1e-3:
        return np.zeros_like(channel)
    channel -= lo
    channel /= hi - lo
    return channel


def classic_input(tile: np.ndarray, nchan: int = 2, invert: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (nchan, H, W) float32 as Cellpose 3 prepares it with channels=[0, 0].

    1 or 2 channels: the gray image (mean of R, G, B), normalised, inverted when
    asked (dark nuclei on a bright slide become bright, as in the fluorescence
    images the nets mostly saw), and a zero second channel (no nuclear channel);
    3: R, G and B each normalised (a user model trained on colour).
    """
    rgb = np.asarray(tile, np.float32)
    if nchan in (1, 2):
        gray = normalise99(rgb.mean(axis=-1))
        if invert and gray.any():
            gray = 1.0 - gray
        planes = [gray] + [np.zeros_like(gray)] * (nchan - 1)
    elif nchan == 3:
        planes = [normalise99(rgb[..., c]) for c in range(3)]
        if invert:
            planes = [1.0 - p if p.any() else p for p in planes]
    else:
        raise ModelError(f"a classic Cellpose net with {nchan} input channels cannot take RGB tiles (1, 2 or 3 can)")
    return np.stack(planes)


def _starts(length: int, block: int, overlap: float) -> np.ndarray:
    """Block origins along one axis, as Cellpose places them: evenly from 0 to the end, overlapping."""
    if length <= block:
        return np.zeros(1, np.int64)
    count = math.ceil((1.0 + 2.0 * overlap) * length / block)
    return np.linspace(0, length - block, count).astype(np.int64)


def taper(height: int, width: int) -> torch.Tensor:
    """Blending weights of a block: 1 inside, a logistic fall-off (scale 7.5 px) centred 20 px in from each edge.

    The profile is laid out on a side of at least 224 px and cut to the block, as Cellpose does.
    """
    side = max(BLOCK, height, width)
    distance = (torch.arange(side, dtype=torch.float32) - (side - 1) / 2).abs()
    profile = torch.sigmoid(-(distance - (side / 2 - 20)) / 7.5)
    rows = profile[side // 2 - height // 2 : side // 2 - height // 2 + height]
    cols = profile[side // 2 - width // 2 : side // 2 - width // 2 + width]
    return rows[:, None] * cols[None, :]


def _pads(length: int) -> tuple[int, int]:
    extra = int(PAD_MULTIPLE * math.ceil(length / PAD_MULTIPLE) - length)
    half = PAD_MULTIPLE // 2
    return half + extra // 2, half + extra - extra // 2


def predict_flows(
    network: nn.Module,
    image: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    block: int = BLOCK,
    overlap: float = BLOCK_OVERLAP,
    batch_size: int = 8,
) -> np.ndarray:
    """(C, H, W) normalised image -> (3, H, W) float32 (dY, dX, cell probability logit), blended over blocks.

    Cellpose 3's test-time tiling: zero padding (8 px and up to a multiple of 16),
    blocks of `block` px (or the whole image when smaller), each weighted by
    `taper` and averaged where they overlap.
    """
    device = torch.device(device)
    h, w = image.shape[1:]
    (top, bottom), (left, right) = _pads(h), _pads(w)
    x = torch.from_numpy(np.ascontiguousarray(image, np.float32)).to(device)
    x = F.pad(x, (left, right, top, bottom))
    ph, pw = x.shape[-2:]
    bh, bw = min(block, ph), min(block, pw)
    corners = [(int(y), int(x0)) for y in _starts(ph, bh, overlap) for x0 in _starts(pw, bw, overlap)]
    weight = taper(bh, bw).to(device)
    total = torch.zeros((NOUT, ph, pw), device=device)
    norm = torch.zeros((ph, pw), device=device)
    with torch.inference_mode():
        for first in range(0, len(corners), batch_size):
            chunk = corners[first : first + batch_size]
            batch = torch.stack([x[:, y : y + bh, x0 : x0 + bw] for y, x0 in chunk])
            out = network(batch)[0].float()
            for (y, x0), flows in zip(chunk, out, strict=True):
                total[:, y : y + bh, x0 : x0 + bw] += flows[:NOUT] * weight
                norm[y : y + bh, x0 : x0 + bw] += weight
    return (total / norm)[:, top : top + h, left : left + w].cpu().numpy()
