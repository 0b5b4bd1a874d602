"""The glomerulus networks of the BMC Nephrology paper, built from a `ModelConfig`."""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .errors import ModelError


def build_network(config: ModelConfig, *, encoder_weights: str | None = None) -> nn.Module:
    """U-Net, U-Net 3+ or Swin-Transformer U-Net with fresh (or ImageNet-encoder) weights."""
    import segmentation_models_pytorch as smp

    kwargs = dict(config.encoder_kwargs)
    try:
        if config.arch == "unet":
            return smp.Unet(
                config.encoder, encoder_weights=encoder_weights, classes=config.out_channels, **config.decoder, **kwargs
            )
        if config.arch == "unet3plus":
            from .unet3plus import UNet3Plus

            return UNet3Plus(
                config.encoder, encoder_weights=encoder_weights, classes=config.out_channels, **config.decoder, **kwargs
            )
        # swin_unet: a timm Swin encoder ("tu-swin_*") under smp's U-Net decoder, at the network's input size
        if not config.encoder.startswith("tu-swin"):
            raise ModelError(f"swin_unet needs a timm Swin encoder (tu-swin_...), not {config.encoder!r}")
        return smp.Unet(
            config.encoder,
            encoder_weights=encoder_weights,
            classes=config.out_channels,
            img_size=config.input_size,
            **kwargs,
        )
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ModelError(f"cannot build {config.arch} with encoder {config.encoder!r}: {message}") from None
