"""U-Net 3+ (Huang et al., ICASSP 2020) on any segmentation-models-pytorch / timm encoder.

Every decoder stage sees every scale: shallower encoder features max-pooled down,
the same-level encoder feature, and deeper decoder outputs upsampled, each brought
to `cat_channels` and fused. Optional deep supervision adds a head per stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _Stage(nn.Module):
    def __init__(self, branch_channels: list[int], cat_channels: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(_conv(c, cat_channels) for c in branch_channels)
        self.fuse = _conv(cat_channels * len(branch_channels), cat_channels * len(branch_channels))


class UNet3Plus(nn.Module):
    """Full-scale skip connections; outputs logits at the input size ((N, classes, H, W))."""

    def __init__(
        self,
        encoder_name: str = "resnet34",
        *,
        encoder_depth: int = 5,
        encoder_weights: str | None = None,
        in_channels: int = 3,
        classes: int = 1,
        cat_channels: int = 64,
        deep_supervision: bool = False,
        **encoder_kwargs,
    ) -> None:
        super().__init__()
        from segmentation_models_pytorch.encoders import get_encoder

        self.encoder = get_encoder(
            encoder_name, in_channels=in_channels, depth=encoder_depth, weights=encoder_weights, **encoder_kwargs
        )
        channels = list(self.encoder.out_channels)[1:]  # strides 2 .. 2**depth; stride 1 is the image itself
        n = len(channels)
        fused = cat_channels * n
        self.stages = nn.ModuleList()
        for i in range(n - 2, -1, -1):  # decoder levels, deepest first
            branch = [channels[j] if j <= i or j == n - 1 else fused for j in range(n)]
            self.stages.append(_Stage(branch, cat_channels))
        self.head = nn.Conv2d(fused, classes, 3, padding=1)
        self.deep_supervision = deep_supervision
        if deep_supervision:  # one head per deeper decoder output and for the bottleneck
            self.side_heads = nn.ModuleList(nn.Conv2d(fused, classes, 3, padding=1) for _ in range(n - 2))
            self.side_heads.append(nn.Conv2d(channels[-1], classes, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        size = x.shape[-2:]
        features = self.encoder(x)[1:]
        n = len(features)
        decoded = {n - 1: features[-1]}
        for stage, i in zip(self.stages, range(n - 2, -1, -1), strict=True):
            target = features[i].shape[-2:]
            parts = []
            for j, branch in enumerate(stage.branches):
                if j < i:
                    part = F.adaptive_max_pool2d(features[j], target)
                elif j == i:
                    part = features[i]
                else:
                    part = F.interpolate(decoded[j], size=target, mode="bilinear", align_corners=False)
                parts.append(branch(part))
            decoded[i] = stage.fuse(torch.cat(parts, dim=1))
        out = F.interpolate(self.head(decoded[0]), size=size, mode="bilinear", align_corners=False)
        if not (self.deep_supervision and self.training):
            return out
        sides = [
            F.interpolate(head(decoded[level]), size=size, mode="bilinear", align_corners=False)
            for head, level in zip(self.side_heads, range(1, n), strict=True)
        ]
        return [out, *sides]
