"""The paper's augmentations, with torchvision's v2 transforms: image and mask move together.

Flips, 90-degree rotations and shift-scale-rotate act on both (the mask with
nearest neighbour, glass-white fill for the image); noise, blur, brightness /
contrast and hue / saturation act on the image alone. Random numbers come from
torch's generator, so a seeded run is repeatable.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


class Augment:
    def __init__(self) -> None:
        fill = {tv_tensors.Image: 255, tv_tensors.Mask: 0}
        self.geometric = v2.Compose(
            [
                v2.RandomHorizontalFlip(),
                v2.RandomVerticalFlip(),
                v2.RandomApply(
                    [v2.RandomAffine(degrees=15, translate=(0.0625, 0.0625), scale=(0.9, 1.1), fill=fill)], p=0.5
                ),
            ]
        )
        self.colour = v2.Compose(
            [
                v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2)], p=0.5),
                v2.RandomApply([v2.ColorJitter(saturation=0.2, hue=0.05)], p=0.5),
                v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.2),
            ]
        )
        self.noise = v2.RandomApply([v2.GaussianNoise(sigma=0.03)], p=0.2)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, S, S) uint8 image and (S, S) mask -> (3, S, S) float image in [0, 1] and (S, S) int64 mask."""
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        k = int(torch.randint(0, 4, ()))
        image, mask = torch.rot90(image, k, (-2, -1)), torch.rot90(mask, k, (-2, -1))
        image, mask = self.geometric(tv_tensors.Image(image), tv_tensors.Mask(mask))
        image = self.colour(image)
        image = self.noise(image.float() / 255).clamp(0, 1)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()
