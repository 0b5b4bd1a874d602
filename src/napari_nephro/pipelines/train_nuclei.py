"""Train or fine-tune a nuclei network from files: instance annotations + images in, a model out.

Three starts: fresh (a U-Net with HoVer heads, `nephro train --task nuclei`), our
own nuclei checkpoint (`--from FOLDER`, or `--from nuclei` for the shipped one),
or a published CellViT checkpoint (`--from cellvit:FILE.pth`: its nuclear and HV
branches are fine-tuned, the encoder frozen or not; the result is a CellViT
checkpoint in the same layout, which `--model cellvit:OUT.pth` runs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .. import __version__
from ..models import ModelConfig, ModelError
from ..models.config import IMAGENET
from ..training.errors import TrainingError
from ..training.loop import Step, check_output
from ..training.nuclei_data import nucleus_images
from ..training.nuclei_loop import NucleiEpoch, NucleiRecipe, NucleiTrainResult, train_nuclei

DEFAULT_MPP = 0.5  # 20x: the shipped model's scale
DEFAULT_ENCODER = "mobilenet_v2"
DEFAULT_DECODER = [128, 64, 32, 32, 16]
DEFAULT_TILE, DEFAULT_OVERLAP = 512, 48
STRETCH = (1, 99)  # per-tile contrast stretch between these percentiles (models.hover_segmenter.stretch_contrast)


def nuclei_config(
    *, mpp: float | None = None, encoder: str | None = None, decoder_channels: list[int] | None = None
) -> ModelConfig:
    """A fresh HoVer U-Net's config: MobileNetV2 U-Net at 0.5 um/px, 512 px tiles with a 48 px (24 um) halo,
    each tile contrast-stretched."""
    return ModelConfig(
        arch="unet",
        encoder=encoder or DEFAULT_ENCODER,
        classes=["nucleus"],
        mpp=DEFAULT_MPP if mpp is None else mpp,
        tile_size=DEFAULT_TILE,
        overlap=DEFAULT_OVERLAP,
        input_size=DEFAULT_TILE,
        decoder={"decoder_channels": list(decoder_channels or DEFAULT_DECODER)},
        heads="hover",
        normalization={**IMAGENET, "stretch": list(STRETCH)},
    )


def starting_network(init: str | None, mpp, encoder, decoder_channels):
    """(config for the loop, network or None, save function or None) for each kind of start."""
    if init is None:
        return nuclei_config(mpp=mpp, encoder=encoder, decoder_channels=decoder_channels), None, None
    if encoder is not None or decoder_channels:
        raise TrainingError("--encoder and --decoder-channels are for a fresh network, not with --from")
    if str(init).lower().startswith("cellvit:"):
        return _cellvit_start(str(init).partition(":")[2], mpp)
    from ..models.checkpoint import load_checkpoint
    from ..models.hover_segmenter import find_folder

    folder = find_folder(None if str(init) == "nuclei" else init)
    network, config = load_checkpoint(folder)
    if config.heads != "hover":
        raise TrainingError(f"--from {init}: a glomerulus checkpoint; nuclei fine-tuning needs a nuclei model")
    return (replace(config, mpp=mpp) if mpp is not None else config), network, None


def _cellvit_start(path: str, mpp):
    import torch

    from ..common.atomic import atomic_output
    from ..models import cellvit

    file = cellvit.find_checkpoint(path or None)
    data = cellvit.read_checkpoint(file)
    spec = cellvit.spec_from_checkpoint(data, file)
    if mpp is not None and abs(mpp - spec.mpp) > 1e-6:
        raise TrainingError(f"--mpp {mpp}: this CellViT works at {spec.mpp} um/px, fine-tuning keeps it")
    network = cellvit.network_from_checkpoint(data, spec, file)
    # the loop's view of it: scale, normalisation, post-processing (the network itself is CellViT's)
    config = ModelConfig(
        arch="unet",
        classes=["nucleus"],
        mpp=spec.mpp,
        heads="hover",
        normalization={"mean": list(spec.mean), "std": list(spec.std)},
    )

    def save(net, out: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        fine_tuned = {**data, "model_state_dict": state, "napari_nephro": {"fine_tuned_from": str(file)}}
        with atomic_output(out) as tmp:
            torch.save(fine_tuned, tmp)

    return config, network, save


def train_nuclei_from_files(
    annotations: str | os.PathLike[str],
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    init: str | None = None,
    mpp: float | None = None,
    image_mpp: float | None = None,
    encoder: str | None = None,
    decoder_channels: list[int] | None = None,
    recipe: NucleiRecipe | None = None,
    device: str = "auto",
    attribution: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_read: Callable[[int, int], None] | None = None,
    on_step: Callable[[Step], None] | None = None,
    on_epoch: Callable[[NucleiEpoch], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> NucleiTrainResult:
    """Nuclei of a file or folder of annotations (matched with `images` by stem) -> a trained model at `out`."""
    recipe = recipe or NucleiRecipe()
    recipe.check()
    out = Path(out)
    cellvit = str(init or "").lower().startswith("cellvit:")
    if cellvit and out.suffix.lower() not in (".pth", ".pt"):
        raise TrainingError(f"{out}: a fine-tuned CellViT is a checkpoint file: name it .pth")
    check_output(out, resume=resume, overwrite=overwrite)
    try:
        config, network, save = starting_network(init, mpp, encoder, decoder_channels)
    except ModelError as exc:
        raise TrainingError(str(exc)) from None
    data = nucleus_images(annotations, images, mpp=config.mpp, image_mpp=image_mpp, progress=on_read)
    provenance = {
        "trained_with": f"napari-nephro {__version__}",
        "data": {"annotations": str(annotations), "images": str(images)},
        **({"attribution": attribution} if attribution else {}),
        **({"fine_tuned_from": str(init)} if init else {}),
    }
    return train_nuclei(
        data,
        config,
        out,
        recipe=recipe,
        network=network,
        save=save,
        device=device,
        resume=resume,
        overwrite=overwrite,
        provenance=provenance,
        on_step=on_step,
        on_epoch=on_epoch,
        stop=stop,
    )
