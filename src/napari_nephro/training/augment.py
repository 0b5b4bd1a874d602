"""The paper's augmentations, with torchvision's v2 transforms, plus stain and scale jitter for little data.

Flips, 90-degree rotations and shift-scale-rotate act on both image and mask (the
mask with nearest neighbour, glass-white fill for the image); noise, blur,
brightness / contrast and hue / saturation act on the image alone.

Two more make a model trained on a few dozen images hold on other labs' slides:

- stain jitter in HED space (Tellez et al., "Whole-slide mitosis detection in H&E
  breast histology using PHH3 as a reference", IEEE TMI 2018): the image is split
  into its stains by colour deconvolution (scikit-image's HED matrices), each stain's
  amount is scaled by 1 +- `stain` and shifted by +- `stain` / 10, and the image is
  recomposed. Unlike a hue shift this changes how much of each dye there is, which
  is how PAS, PASM and trichrome slides from different labs differ;
- scale jitter (`scale`: the zoom range), because a slide's stated pixel size is
  often off by 20 % or more, and glomeruli differ in size between patients.

Random numbers come from torch's generator, so a seeded run is repeatable.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

STAIN_JITTER = 0.3  # each stain's amount scaled by 1 +- this
SHIFT = 0.15  # of the tile's side: the paper's 0.0625 leaves a glomerulus where the grid cut it
SCALE_JITTER = 0.3  # zoom between 1 / 1.3 and 1.3: about +-30 % in size
STAIN_SHIFT = 0.1  # the shift of a stain's optical density, relative to the jitter (densities are mostly < 1)


def jitter_stains(image: torch.Tensor, amount: float) -> torch.Tensor:
    """(3, S, S) uint8 image with each HED stain's amount scaled by 1 +- amount and shifted; uint8 out.

    The deconvolution uses scikit-image's HED matrices in optical density, without
    `rgb2hed`'s clipping of negative amounts: colours outside the H-E-DAB basis (the
    blue of a trichrome) come back unchanged when nothing is jittered (black, 0, comes back as 1).
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    scale = (1 + (torch.rand(3) * 2 - 1) * amount).numpy()
    shift = ((torch.rand(3) * 2 - 1) * amount * STAIN_SHIFT).numpy()
    rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
    density = -np.log(np.maximum(rgb, 1) / 255)
    stains = density @ hed_from_rgb.astype(np.float32)
    glass = density.sum(-1) < 0.05  # no dye: leave white white (a shift would tint the glass)
    stains = stains * scale + shift
    out = np.clip(255 * np.exp(-(stains @ rgb_from_hed.astype(np.float32))), 0, 255).round()
    out = np.where(glass[..., None], rgb, out)
    return torch.from_numpy(out.astype(np.uint8)).permute(2, 0, 1)


class Augment:
    def __init__(
        self,
        stain: float = STAIN_JITTER,
        scale: tuple[float, float] = (1 / (1 + SCALE_JITTER), 1 + SCALE_JITTER),
        blur: float = 0.2,
    ) -> None:
        """`blur`: the chance of a Gaussian blur (sigma 0.1 to 1.5 px); nuclei models take more, since
        a slide out of focus blurs a nucleus's edge over several of its pixels."""
        fill = {tv_tensors.Image: 255, tv_tensors.Mask: 0}
        self.stain = stain
        self.geometric = v2.Compose(
            [
                v2.RandomHorizontalFlip(),
                v2.RandomVerticalFlip(),
                v2.RandomApply(
                    [v2.RandomAffine(degrees=15, translate=(SHIFT, SHIFT), scale=tuple(scale), fill=fill)], p=0.7
                ),
            ]
        )
        self.colour = v2.Compose(
            [
                v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2)], p=0.5),
                v2.RandomApply([v2.ColorJitter(saturation=0.2, hue=0.05)], p=0.5),
                v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=blur),
            ]
        )
        self.noise = v2.RandomApply([v2.GaussianNoise(sigma=0.03)], p=0.2)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, S, S) uint8 image and (S, S) mask -> (3, S, S) float image in [0, 1] and (S, S) int64 mask."""
        if self.stain > 0 and bool(torch.rand(()) < 0.8):
            image = jitter_stains(image, self.stain)
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        k = int(torch.randint(0, 4, ()))
        image, mask = torch.rot90(image, k, (-2, -1)), torch.rot90(mask, k, (-2, -1))
        image, mask = self.geometric(tv_tensors.Image(image), tv_tensors.Mask(mask))
        image = self.colour(image)
        image = self.noise(image.float() / 255).clamp(0, 1)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()
