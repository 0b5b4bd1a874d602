"""CellViT (Hörst et al., Medical Image Analysis 2024) as an `InstanceSegmenter`, with its published checkpoints.

CellViT is a UNETR: a vision transformer encoder whose token maps of four depths
are upsampled by convolutional skip paths into three decoders of the same shape
(nuclear foreground, 2 channels; horizontal-vertical map, 2 channels; nuclear
types, 6 channels for PanNuke: background, neoplastic, inflammatory, connective,
dead, epithelial), plus a tissue head (19 PanNuke tissues). The encoder is either
HIPT's ViT-256 (ViT-S/16: width 384, depth 12, 6 heads; `CellViT256`) or the
image encoder of Segment Anything (windowed attention with decomposed relative
positions and a convolutional neck; `CellViTSAM` with SAM-B, SAM-L or SAM-H).
Nuclei come out of the maps by HoVer-Net post-processing (`hovernet`).

The network is written here from the architecture and the module names of the
authors' code (TIO-IKIM/CellViT), so a published checkpoint's `model_state_dict`
loads strictly with every key used; the `cellvit` package is not needed.

Weights: a checkpoint is read with `torch.load(weights_only=True)` (nothing in it
can run code) and must hold "arch", "model_state_dict" and "config" as the
authors' trainer writes them. `load(None)` looks for the published files in
$NAPARI_NEPHRO_CELLVIT, else in `<cache>/cellvit` (cache: $NAPARI_NEPHRO_CACHE,
else `platformdirs.user_cache_dir("napari-nephro")`), in this order:
CellViT-SAM-H-x40.pth, CellViT-256-x40.pth, CellViT-SAM-H-x20.pth,
CellViT-256-x20.pth. Nothing is ever downloaded. The weights' licence is told once
per process (`warnings.warn`) and kept on the segmenter as `licence`.

Tiles: the authors infer on 1024 px tiles overlapping by 64 px; both encoders
take any side that is a multiple of 16 (ViT-256 by interpolating its position
grid, SAM by cutting its 64 x 64 grid, so up to 1024 px). Pixels are scaled to
[0, 1] and normalised with the checkpoint's mean and std (0.5, 0.5, 0.5 each).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .device import pick_device
from .errors import ModelError
from .hovernet import HoverParams, hover_instances
from .instances import TileInstances

DEFAULT_TILE = 1024
PATCH = 16  # both encoders cut the image into 16 px tokens
SAM_GRID = 64  # SAM's position grid: 1024 px / 16
NUCLEI_TYPES = ["neoplastic", "inflammatory", "connective", "dead", "epithelial"]  # PanNuke, background dropped
TISSUE_TYPES = [
    "Adrenal_gland", "Bile-duct", "Bladder", "Breast", "Cervix", "Colon", "Esophagus", "HeadNeck", "Kidney", "Liver",
    "Lung", "Ovarian", "Pancreatic", "Prostate", "Skin", "Stomach", "Testis", "Thyroid", "Uterus",
]  # fmt: skip
README = "https://github.com/TIO-IKIM/CellViT#inference"
CHECKPOINT_URLS = {  # the download links of the CellViT README, section Inference
    "CellViT-SAM-H-x40.pth": "https://drive.google.com/uc?export=download&id=1MvRKNzDW2eHbQb5rAgTEp6s2zAXHixRV",
    "CellViT-256-x40.pth": "https://drive.google.com/uc?export=download&id=1tVYAapUo1Xt8QgCN22Ne1urbbCZkah8q",
    "CellViT-SAM-H-x20.pth": "https://drive.google.com/uc?export=download&id=1wP4WhHLNwyJv97AK42pWK8kPoWlrqi30",
    "CellViT-256-x20.pth": "https://drive.google.com/uc?export=download&id=1w99U4sxDQgOSuiHMyvS_NYBiz6ozolN2",
}
FOLDER_ENV = "NAPARI_NEPHRO_CELLVIT"
_CITE = "cite Hörst et al., CellViT, Medical Image Analysis 2024"
LICENCES = {  # as the CellViT README ("Apache 2.0 with Commons Clause") and its LICENSE file state them
    "CellViT256": (
        "CellViT-256 weights: Apache 2.0 with Commons Clause (derived from Mahmood Lab's HIPT: no selling or "
        "commercial use without written permission; see https://github.com/TIO-IKIM/CellViT/blob/main/LICENSE); "
        f"trained on PanNuke (CC BY-NC-SA 4.0); {_CITE}"
    ),
    "CellViTSAM": (
        "CellViT-SAM weights: Apache 2.0 for the SAM-derived encoder, CellViT's own parts Apache 2.0 with Commons "
        "Clause (no selling without the authors' written permission; see "
        f"https://github.com/TIO-IKIM/CellViT/blob/main/LICENSE); trained on PanNuke (CC BY-NC-SA 4.0); {_CITE}"
    ),
}
LICENCES["CellViT"] = (
    "CellViT weights of a custom ViT: under the terms of whoever trained them; the CellViT design is the authors' "
    f"(Apache 2.0 with Commons Clause, see https://github.com/TIO-IKIM/CellViT/blob/main/LICENSE); {_CITE}"
)
# seconds per megapixel on 2 CPU cores in float32: one 1024 px tile, forward pass and post-processing, real-size
# networks with random weights (ViT-256 37 s, SAM-B 34 s, SAM-L 48 s, SAM-H 68 s a tile; SAM-H peaks at 5.9 GB)
CPU_SECONDS_PER_MEGAPIXEL = {"CellViT256": 40.0, "SAM-B": 35.0, "SAM-L": 50.0, "SAM-H": 70.0}
SAM_SIZES = {  # embed width, depth, heads, global-attention blocks, extracted blocks (1-based)
    "SAM-B": (768, 12, 12, (2, 5, 8, 11), (3, 6, 9, 12)),
    "SAM-L": (1024, 24, 16, (5, 11, 17, 23), (6, 12, 18, 24)),
    "SAM-H": (1280, 32, 16, (7, 15, 23, 31), (8, 16, 24, 32)),
}
OPTIONS = ("tile_size", "overlap", "batch_size", "half")
OVERLAP_UM = 24.0  # halo: larger than the largest nucleus (tumour nuclei reach about 20 um)
_told: set[str] = set()  # licences already told in this process


# ---------------------------------------------------------------------------------------------- building blocks


class ConvBlock(nn.Module):
    """Convolution, batch norm, ReLU, dropout: the decoders' unit (keys `block.0`, `block.1`)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(cin, cout, kernel, padding=(kernel - 1) // 2),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UpBlock(nn.Module):
    """Doubling the side: transposed convolution, then convolution, batch norm, ReLU, dropout (skip paths)."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, 2, stride=2),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _up(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, 2, stride=2)


# ------------------------------------------------------------------------------------------- ViT-256 encoder


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SelfAttention(nn.Module):
    """Global multi-head self-attention over a token sequence (B, N, C)."""

    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, **dropouts: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, heads, dropouts.get("attn", 0.0), dropouts.get("drop", 0.0))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropouts.get("drop", 0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class ViTEncoder(nn.Module):
    """HIPT's ViT (DINO layout): class token, learnt positions for a 224 px grid resampled to the input's grid.

    Returns the tissue logits (head on the normed class token) and the token maps
    (B, C, H/16, W/16) after the four `extract` blocks (1-based).
    """

    def __init__(
        self, dim: int, depth: int, heads: int, extract: Sequence[int], tissues: int, drop: float = 0.0
    ) -> None:
        super().__init__()
        grid = 224 // PATCH
        self.extract = tuple(extract)
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, drop=drop) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, tissues) if tissues > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """The position table for a rows x cols grid: bicubic, with DINO's +0.1 in the scale factor (so the
        weights see the positions they were trained with)."""
        table = self.pos_embed
        n = table.shape[1] - 1
        side = int(math.sqrt(n))
        if rows * cols == n and rows == cols:
            return table
        grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([table[:, :1], grid], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rows, cols = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.positions(rows, cols)
        maps = []
        for depth, block in enumerate(self.blocks, start=1):
            tokens = block(tokens)
            if depth in self.extract:
                maps.append(tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, rows, cols))
        return self.head(self.norm(tokens)[:, 0]), maps


# ----------------------------------------------------------------------------------------------- SAM encoder


class SamMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1, self.lin2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


def _relative_table(size: int, table: torch.Tensor) -> torch.Tensor:
    """(size, size, C) embeddings of the offsets between query and key positions on one axis, the learnt
    table linearly resampled when it was made for another size."""
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(table.T[None], size=length, mode="linear")[0].T
    offsets = torch.arange(size, device=table.device)[:, None] - torch.arange(size, device=table.device)[None, :]
    return table[offsets + size - 1]


class SamAttention(nn.Module):
    """Self-attention on a (B, H, W, C) grid with decomposed relative positions added to the logits."""

    def __init__(self, dim: int, heads: int, grid: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, dim // heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, dim // heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, heads, HW, d)
        rq = q.reshape(b, self.heads, h, w, -1)
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", rq, _relative_table(h, self.rel_pos_h))
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", rq, _relative_table(w, self.rel_pos_w))
        bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, self.heads, h * w, h * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class SamBlock(nn.Module):
    """A SAM transformer block: attention inside `window` x `window` token windows (zero-padded), or global."""

    def __init__(self, dim: int, heads: int, window: int, grid: int) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SamAttention(dim, heads, window or grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SamMlp(dim, dim * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window:
            b, h, w, c = y.shape
            s = self.window
            ph, pw = -h % s, -w % s
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            y = y.reshape(b, hp // s, s, wp // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
            y = self.attn(y)
            y = y.reshape(b, hp // s, wp // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
            y = y[:, :h, :w]
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - mean) / torch.sqrt(var + self.eps) + self.bias[:, None, None]


class SamEncoder(nn.Module):
    """SAM's image encoder (ViTDet layout) as CellViT uses it: token maps (B, C, H/16, W/16) after the four
    `extract` blocks, and the neck's 256 channels averaged over the grid for the tissue head."""

    def __init__(
        self, dim: int, depth: int, heads: int, global_blocks: Sequence[int], extract: Sequence[int], window: int = 14
    ) -> None:
        super().__init__()
        self.extract = tuple(extract)
        self.patch_embed = PatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, SAM_GRID, SAM_GRID, dim))
        self.blocks = nn.ModuleList(
            SamBlock(dim, heads, 0 if i in global_blocks else window, SAM_GRID) for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(dim, 256, 1, bias=False),
            LayerNorm2d(256),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            LayerNorm2d(256),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tokens = self.patch_embed(x).permute(0, 2, 3, 1)
        h, w = tokens.shape[1:3]
        if h > SAM_GRID or w > SAM_GRID:
            raise ValueError(f"SAM encoders take at most {SAM_GRID * PATCH} px, not {x.shape[-2]} x {x.shape[-1]}")
        tokens = tokens + self.pos_embed[:, :h, :w]
        maps = []
        for depth, block in enumerate(self.blocks, start=1):
            tokens = block(tokens)
            if depth in self.extract:
                maps.append(tokens.permute(0, 3, 1, 2))
        return self.neck(tokens.permute(0, 3, 1, 2)).mean(dim=(2, 3)), maps


# ------------------------------------------------------------------------------------------------- CellViT


def _branch(dim: int, bottleneck: int, out: int, dropout: float) -> nn.Sequential:
    """One decoder: from the deepest tokens up to full resolution, taking a skip at every scale."""
    return nn.Sequential(
        OrderedDict(
            bottleneck_upsampler=_up(dim, bottleneck),
            decoder3_upsampler=nn.Sequential(
                ConvBlock(bottleneck * 2, bottleneck, dropout=dropout),
                ConvBlock(bottleneck, bottleneck, dropout=dropout),
                ConvBlock(bottleneck, bottleneck, dropout=dropout),
                _up(bottleneck, 256),
            ),
            decoder2_upsampler=nn.Sequential(
                ConvBlock(512, 256, dropout=dropout), ConvBlock(256, 256, dropout=dropout), _up(256, 128)
            ),
            decoder1_upsampler=nn.Sequential(
                ConvBlock(256, 128, dropout=dropout), ConvBlock(128, 128, dropout=dropout), _up(128, 64)
            ),
            decoder0_header=nn.Sequential(
                ConvBlock(128, 64, dropout=dropout), ConvBlock(64, 64, dropout=dropout), nn.Conv2d(64, out, 1)
            ),
        )
    )


class CellViT(nn.Module):
    """Encoder, four shared skip paths (`decoder0`..`decoder3`) and three decoders; `forward` gives logits.

    `forward(x)` with x (B, 3, H, W), H and W multiples of 16, returns a dict:
    nuclei_binary_map (B, 2, H, W), hv_map (B, 2, H, W), nuclei_type_map
    (B, nuclei_types, H, W) and tissue_types (B, tissues); with `regression` the
    binary decoder has two more channels, returned as regression_map.
    """

    def __init__(
        self, encoder: nn.Module, dim: int, nuclei_types: int, tissues: int, regression: bool = False, drop=0.0
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.regression = regression
        wide = dim >= 512
        skip1, skip2, bottleneck = (512, 256, 512) if wide else (256, 128, 312)
        self.decoder0 = nn.Sequential(ConvBlock(3, 32, dropout=drop), ConvBlock(32, 64, dropout=drop))
        self.decoder1 = nn.Sequential(UpBlock(dim, skip1, drop), UpBlock(skip1, skip2, drop), UpBlock(skip2, 128, drop))
        self.decoder2 = nn.Sequential(UpBlock(dim, skip1, drop), UpBlock(skip1, 256, drop))
        self.decoder3 = nn.Sequential(UpBlock(dim, bottleneck, drop))
        self.nuclei_binary_map_decoder = _branch(dim, bottleneck, 4 if regression else 2, drop)
        self.hv_map_decoder = _branch(dim, bottleneck, 2, drop)
        self.nuclei_type_maps_decoder = _branch(dim, bottleneck, nuclei_types, drop)
        self.sam = isinstance(encoder, SamEncoder)
        if self.sam:  # SAM's tissue head sits outside the encoder, on the neck's 256 channels
            self.classifier_head = nn.Linear(256, tissues) if tissues > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-2] % PATCH or x.shape[-1] % PATCH:
            raise ValueError(f"CellViT needs sides that are multiples of {PATCH}, not {tuple(x.shape[-2:])}")
        tissue, (z1, z2, z3, z4) = self.encoder(x)
        if self.sam:
            tissue = self.classifier_head(tissue)
        skips = (self.decoder0(x), self.decoder1(z1), self.decoder2(z2), self.decoder3(z3))
        out = {"tissue_types": tissue}
        binary = self._decode(self.nuclei_binary_map_decoder, z4, skips)
        out["nuclei_binary_map"] = binary[:, :2]
        if self.regression:
            out["regression_map"] = binary[:, 2:]
        out["hv_map"] = self._decode(self.hv_map_decoder, z4, skips)
        out["nuclei_type_map"] = self._decode(self.nuclei_type_maps_decoder, z4, skips)
        return out

    @staticmethod
    def _decode(branch: nn.Sequential, z4: torch.Tensor, skips: tuple[torch.Tensor, ...]) -> torch.Tensor:
        b0, b1, b2, b3 = skips
        y = branch.bottleneck_upsampler(z4)
        y = branch.decoder3_upsampler(torch.cat([b3, y], dim=1))
        y = branch.decoder2_upsampler(torch.cat([b2, y], dim=1))
        y = branch.decoder1_upsampler(torch.cat([b1, y], dim=1))
        return branch.decoder0_header(torch.cat([b0, y], dim=1))


@dataclass
class CellViTSpec:
    """What a checkpoint's arch and config say about the network and how it was trained."""

    arch: str  # CellViT256, CellViTSAM or CellViT (any ViT of DINO layout)
    nuclei_types: int = 6  # including background
    tissues: int = 19
    backbone: str = "ViT256"  # SAM-B / SAM-L / SAM-H for CellViTSAM
    embed_dim: int = 384
    depth: int = 12
    heads: int = 6
    extract: tuple[int, ...] = (3, 6, 9, 12)
    regression: bool = False
    magnification: float = 40.0
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    type_names: list[str] = field(default_factory=lambda: list(NUCLEI_TYPES))

    @property
    def mpp(self) -> float:
        """40x is 0.25 um/px, as PanNuke's patches are."""
        return 10.0 / self.magnification

    @property
    def size_name(self) -> str:
        return self.backbone if self.arch == "CellViTSAM" else self.arch


def build_cellvit(spec: CellViTSpec) -> CellViT:
    """The network a spec describes, randomly initialised (build under `torch.device("meta")` to skip that)."""
    if spec.arch == "CellViTSAM":
        dim, depth, heads, global_blocks, extract = SAM_SIZES[spec.backbone]
        encoder = SamEncoder(dim, depth, heads, global_blocks, extract)
    else:
        dim = spec.embed_dim
        encoder = ViTEncoder(dim, spec.depth, spec.heads, spec.extract, spec.tissues)
    return CellViT(encoder, dim, spec.nuclei_types, spec.tissues, spec.regression)


# ------------------------------------------------------------------------------------------------- checkpoints


def weights_folder() -> Path:
    """Where `load(None)` looks: $NAPARI_NEPHRO_CELLVIT, else <cache>/cellvit."""
    env = os.environ.get(FOLDER_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("NAPARI_NEPHRO_CACHE")
    if cache:
        return Path(cache).expanduser() / "cellvit"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-nephro")) / "cellvit"


def _missing(wanted: str | None) -> ModelError:
    folder = weights_folder()
    name = wanted if wanted in CHECKPOINT_URLS else None
    if name:
        what = f"download {name} from {CHECKPOINT_URLS[name]}"
    elif wanted:
        return ModelError(f"CellViT checkpoint {wanted} not found: give the path of a .pth file from {README}")
    else:
        what = (
            f"download CellViT-SAM-H-x40.pth from {CHECKPOINT_URLS['CellViT-SAM-H-x40.pth']} (or the lighter "
            f"CellViT-256-x40.pth from {CHECKPOINT_URLS['CellViT-256-x40.pth']})"
        )
    return ModelError(
        f"CellViT weights not found: {what} (links in {README}) and put it in {folder} "
        f"(or set {FOLDER_ENV} to its folder, or give its path)"
    )


def find_checkpoint(path: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint file `path` names: a file, a folder holding a published one, a published name (with or
    without .pth, looked up in `weights_folder()`), or None for the first published one found there."""
    if path is None:
        for name in CHECKPOINT_URLS:
            if (weights_folder() / name).is_file():
                return weights_folder() / name
        raise _missing(None)
    given = Path(path).expanduser()
    if given.is_file():
        return given
    if given.is_dir():
        for name in CHECKPOINT_URLS:
            if (given / name).is_file():
                return given / name
        raise ModelError(f"{given}: holds none of {', '.join(CHECKPOINT_URLS)}; download one from {README}")
    name = given.name if given.suffix == ".pth" else f"{given.name}.pth"
    if len(given.parts) == 1 and (weights_folder() / name).is_file():
        return weights_folder() / name
    raise _missing(name if name in CHECKPOINT_URLS else str(given))


def _numpy_globals() -> list:
    """Numpy scalars and dtypes, which a training config can hold and which carry data, not code; the scalar
    under its numpy 1 name too, as checkpoints written then name it."""
    scalar = np._core.multiarray.scalar
    kinds: list = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    kinds += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return kinds


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's dict, read without running anything it holds; anything else is a one-line error."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            # mapped, not read: a 2.8 GB checkpoint is not held twice (old non-zip files cannot be mapped)
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        reason = str(exc).strip().splitlines()
        detail = next((line.strip() for line in reason if "Unsupported global" in line), reason[0] if reason else "")
        raise ModelError(
            f"{path}: not a CellViT checkpoint napari-nephro can read safely ({exc.__class__.__name__}: "
            f"{detail[:200]}); use a checkpoint from {README}"
        ) from None
    if not isinstance(data, dict) or "model_state_dict" not in data or "arch" not in data:
        raise ModelError(
            f"{path}: not a CellViT checkpoint (it has no 'arch' and 'model_state_dict'); use one from {README}"
        )
    return data


def _nested(config: dict) -> dict:
    """The trainer stores its config flattened ('data.num_nuclei_classes': 6); flat, nested or mixed is read."""
    out: dict = {}
    for key, value in config.items():
        *parents, last = str(key).split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        value = _nested(value) if isinstance(value, dict) else value
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last].update(value)
        else:
            node[last] = value
    return out


def spec_from_checkpoint(data: dict, path: Path) -> CellViTSpec:
    """The network and training facts of a checkpoint dict, or a one-line error saying what is wrong."""
    arch = data.get("arch")
    try:
        config = _nested(data.get("config") or {})
        model, dataset = config.get("model", {}), config.get("data", {})
        spec = CellViTSpec(
            arch=str(arch),
            nuclei_types=int(dataset.get("num_nuclei_classes", 6)),
            tissues=int(dataset.get("num_tissue_classes", 19)),
            regression=bool(model.get("regression_loss", False)),
            magnification=float(dataset.get("magnification", 40)),
        )
        if arch == "CellViTSAM":
            spec.backbone = str(model.get("backbone", "")).upper()
            if spec.backbone not in SAM_SIZES:
                raise ModelError(
                    f"{path}: unknown SAM backbone {model.get('backbone')!r} in its config: CellViT has "
                    f"{', '.join(SAM_SIZES)}"
                )
        elif arch == "CellViT":
            spec.backbone = "ViT"
            spec.embed_dim, spec.depth, spec.heads = (
                int(model["embed_dim"]),
                int(model["depth"]),
                int(model["num_heads"]),
            )
            spec.extract = tuple(int(i) for i in model["extract_layers"])
        elif arch != "CellViT256":
            raise ModelError(
                f"{path}: architecture {arch!r} is not supported (CellViT256, CellViTSAM, CellViT are; the shared-"
                f"decoder variants are not published): use a checkpoint from {README}"
            )
        norm = config.get("transformations", {}).get("normalize", {}) or {}
        spec.mean = tuple(float(v) for v in norm.get("mean", spec.mean))
        spec.std = tuple(float(v) for v in norm.get("std", spec.std))
        names = config.get("dataset_config", {}).get("nuclei_types")
        if isinstance(names, dict) and len(names) == spec.nuclei_types:
            ordered = sorted(names.items(), key=lambda item: int(item[1]))
            spec.type_names = [str(name).lower() for name, _ in ordered[1:]]
        elif spec.nuclei_types != len(NUCLEI_TYPES) + 1:
            spec.type_names = [f"type {i}" for i in range(1, spec.nuclei_types)]
    except ModelError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: its CellViT config is incomplete or damaged ({exc!r}); re-download it") from None
    skips_ok = len(set(spec.extract)) == 4 and all(1 <= i <= spec.depth for i in spec.extract)
    if not skips_ok or spec.nuclei_types < 2 or not 0 < spec.magnification <= 100:
        raise ModelError(
            f"{path}: its CellViT config is not usable: it needs 4 distinct skip layers within the depth, "
            f">= 2 nuclei types and a magnification (has {spec.extract}, {spec.nuclei_types}, {spec.magnification})"
        )
    return spec


def network_from_checkpoint(data: dict, spec: CellViTSpec, path: Path) -> CellViT:
    """The network with the checkpoint's weights, every key used and none missing; no random init is spent."""
    state = data["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: its model_state_dict is not a dict of tensors; use a checkpoint from {README}")
    with torch.device("meta"):
        network = build_cellvit(spec)
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        first = (
            f"{len(missing)} missing (e.g. {missing[0]})"
            if missing
            else f"{len(extra)} unexpected (e.g. {extra[0]})"
            if extra
            else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, not {tuple(expected[wrong[0]].shape)}"
        )
        raise ModelError(
            f"{path}: its weights do not match {spec.arch} ({spec.size_name}) as its config describes it: {first}"
        )
    network.load_state_dict(state, strict=True, assign=True)
    return network.float().eval()


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    """Identifies the weights without hashing gigabytes: every key and shape, and a sample of each tensor."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key]
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.reshape(-1)  # the ends of each tensor only: one page each of a mapped file
        digest.update(torch.cat([flat[:64], flat[-64:]]).float().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- adapter


class CellViTSegmenter:
    """A CellViT network as the instance engine sees it: RGB tiles in, typed nuclei out.

    Post-processing runs on the CPU per tile, with the HoVer-Net thresholds of the
    checkpoint's magnification. `predict_maps` gives the network's maps themselves.
    """

    kind = "instance"
    gpu_model = True  # 40-70 s per megapixel on 2 cores: hours for a biopsy, minutes for a visible region
    cpu_seconds_per_megapixel = CPU_SECONDS_PER_MEGAPIXEL["SAM-H"]  # the default weights; per instance below

    def __init__(
        self,
        network: CellViT,
        spec: CellViTSpec,
        *,
        device: torch.device | str = "cpu",
        fingerprint: str = "",
        tile_size: int = DEFAULT_TILE,
        overlap: int | None = None,
        batch_size: int | None = None,
        half: bool | None = None,
        licence: str = "",
    ) -> None:
        self.device = torch.device(device)
        self.network = network.eval().to(self.device)
        self.spec = spec
        self.classes = list(spec.type_names)
        self.mpp = spec.mpp
        self.tile_size = _check_tile(tile_size, spec)
        self.overlap = round(OVERLAP_UM / spec.mpp) if overlap is None else int(overlap)
        if not 0 <= self.overlap < self.tile_size:
            raise ModelError(f"CellViT overlap must be in [0, tile_size={self.tile_size}), not {self.overlap}")
        gpu = self.device.type != "cpu"
        self.batch_size = (4 if gpu else 1) if batch_size is None else int(batch_size)
        if self.batch_size < 1:
            raise ModelError(f"CellViT batch_size must be at least 1, not {batch_size}")
        self.tiles_per_call = self.batch_size
        self.half = bool(gpu if half is None else half) and self.device.type == "cuda"
        self.hover = HoverParams.at_magnification(spec.magnification)
        self.cpu_seconds_per_megapixel = CPU_SECONDS_PER_MEGAPIXEL.get(
            spec.size_name, CPU_SECONDS_PER_MEGAPIXEL["CellViT256"]
        )
        self.licence = licence
        options = f"{self.tile_size}:{self.overlap}:{self.hover}:{spec.mean}:{spec.std}:{spec.magnification}"
        self.fingerprint = hashlib.sha256(f"{fingerprint}:{options}".encode()).hexdigest()[:16]
        self._mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def check_tile(self, tile: int) -> None:
        """Refuse, before a run, a tile side the network cannot take (the engine asks when --tile is given)."""
        _check_tile(tile, self.spec)

    def predict_maps(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """(N, H, W, 3) uint8 -> foreground (N, H, W) probability, hv (N, 2, H, W), types (N, C, H, W) softmax
        (channel 0 background), tissue (N, tissues) softmax; sides padded to a multiple of 16 and cut back."""
        tiles = _check_tiles(tiles)
        n, h, w = tiles.shape[:3]
        ph, pw = -h % PATCH, -w % PATCH
        parts: dict[str, list[np.ndarray]] = {"foreground": [], "hv": [], "types": [], "tissue": []}
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(tiles[start : start + self.batch_size]))
                x = x.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
                x = (x - self._mean) / self._std
                if ph or pw:
                    x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.half):
                    out = self.network(x)
                parts["foreground"].append(out["nuclei_binary_map"].float().softmax(1)[:, 1, :h, :w].cpu().numpy())
                parts["hv"].append(out["hv_map"].float()[:, :, :h, :w].cpu().numpy())
                parts["types"].append(out["nuclei_type_map"].float().softmax(1)[:, :, :h, :w].cpu().numpy())
                parts["tissue"].append(out["tissue_types"].float().softmax(1).cpu().numpy())
        return {key: np.concatenate(value) for key, value in parts.items()}

    def predict_instances(self, tiles: np.ndarray) -> list[TileInstances]:
        """(N, T, T, 3) uint8 RGB -> one TileInstances per tile (classes index `classes`)."""
        maps = self.predict_maps(tiles)
        return [
            hover_instances(fg, hv, types, params=self.hover)
            for fg, hv, types in zip(maps["foreground"], maps["hv"], maps["types"], strict=True)
        ]


def _check_tile(tile_size, spec: CellViTSpec) -> int:
    try:
        tile = int(tile_size)
    except (TypeError, ValueError):
        raise ModelError(f"CellViT tile_size must be a whole number of pixels, not {tile_size!r}") from None
    if tile < PATCH or tile % PATCH:
        raise ModelError(f"CellViT tile_size must be a multiple of {PATCH} px, not {tile}")
    if spec.arch == "CellViTSAM" and tile > SAM_GRID * PATCH:
        raise ModelError(f"CellViT-SAM takes tiles of at most {SAM_GRID * PATCH} px, not {tile}")
    return tile


def _check_tiles(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be (N, H, W, 3) uint8 RGB, not {tiles.shape} {tiles.dtype}")
    return tiles


def _tell_licence(text: str) -> None:
    """The weights' terms, once per process: the user must know before using the results."""
    if text and text not in _told:
        _told.add(text)
        warnings.warn(text, UserWarning, stacklevel=3)


def load(path: str | os.PathLike[str] | None = None, *, device: str = "auto", **options) -> CellViTSegmenter:
    """A CellViT segmenter from a published checkpoint (see the module docstring for where None looks).

    options: tile_size (px, multiple of 16; default 1024, at most 1024 for SAM),
    overlap (px at the model's mpp; default 24 um), batch_size (tiles per forward
    pass; 1 on CPU, 4 on a GPU), half (float16 autocast on CUDA; default on).
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ModelError(f"unknown CellViT option(s) {', '.join(unknown)}: valid ones are {', '.join(OPTIONS)}")
    file = find_checkpoint(path)
    data = read_checkpoint(file)
    spec = spec_from_checkpoint(data, file)
    target = pick_device(device)
    network = network_from_checkpoint(data, spec, file)
    licence = LICENCES[spec.arch]
    segmenter = CellViTSegmenter(
        network, spec, device=target, fingerprint=_weights_digest(network.state_dict()), licence=licence, **options
    )
    _tell_licence(licence)
    return segmenter
