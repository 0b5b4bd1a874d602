"""Train or fine-tune from files: annotations + images in, a checkpoint folder out.

Everything that can be wrong with the inputs (classes, missing images, pixel
sizes, a `--from` checkpoint of another architecture or other classes) is refused
before the first tile is cut.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from .. import __version__
from ..models import ModelConfig, ModelError
from ..training import Recipe, TrainingError, TrainResult, cut_tiles, train
from ..training.loop import Epoch, Step, check_output
from .export import Item, load_items

DEFAULTS = {"mpp": 1.0, "tile": 1024, "overlap": 256, "input_size": 320}


def model_config_for(
    *,
    arch: str | None,
    encoder: str | None,
    decoder_channels: list[int] | None,
    classes: list[str] | None,
    mpp: float | None,
    tile: int | None,
    overlap: int | None,
    input_size: int | None,
    init: Path | None,
) -> tuple[ModelConfig, object | None]:
    """The config to train, and the network to start from (None: fresh)."""
    if init is None:
        decoder = {"decoder_channels": list(decoder_channels)} if decoder_channels else {}
        config = ModelConfig(
            arch=arch or "unet",
            classes=list(classes or ["glomerulus"]),
            encoder=encoder,
            mpp=DEFAULTS["mpp"] if mpp is None else mpp,
            tile_size=DEFAULTS["tile"] if tile is None else tile,
            overlap=DEFAULTS["overlap"] if overlap is None else overlap,
            input_size=DEFAULTS["input_size"] if input_size is None else input_size,
            decoder=decoder,
        )
        return config, None
    from ..models import load_checkpoint

    network, config = load_checkpoint(init)
    if arch is not None and arch != config.arch:
        raise TrainingError(f"--from {init} is a {config.arch}, not a {arch}: drop --arch or start fresh")
    if encoder is not None and encoder != config.encoder:
        raise TrainingError(f"--from {init} has encoder {config.encoder}, not {encoder}")
    if classes is not None and list(classes) != list(config.classes):
        raise TrainingError(
            f"--from {init} predicts {', '.join(config.classes)}; fine-tuning keeps its classes "
            "(map the annotations to them with --map)"
        )
    if input_size is not None and input_size != config.input_size and config.arch == "swin_unet":
        raise TrainingError(f"a Swin U-Net is built for {config.input_size} px input; it cannot change")
    given = (("mpp", mpp), ("tile_size", tile), ("overlap", overlap), ("input_size", input_size))
    changes = {k: v for k, v in given if v is not None}  # `--overlap 0` is a change too; `--tile 0` is refused
    return replace(config, **changes), network


def train_from_files(
    annotations: str | os.PathLike[str],
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    **options,
) -> TrainResult:
    """`train_items` on the annotations of a file or folder, matched with their images by file stem."""
    items = load_items(annotations, slide=images)
    data = {"annotations": str(annotations), "images": str(images)}
    return train_items(items, out, data=data, **options)


def train_items(
    items: list[Item],
    out: str | os.PathLike[str],
    *,
    data: dict | None = None,
    arch: str | None = None,
    encoder: str | None = None,
    decoder_channels: list[int] | None = None,
    classes: list[str] | None = None,
    class_map: Mapping[str, str] | None = None,
    init: str | os.PathLike[str] | None = None,
    mpp: float | None = None,
    image_mpp: float | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    input_size: int | None = None,
    recipe: Recipe | None = None,
    oversample: Mapping[str, float] | None = None,
    allow_empty: bool = False,
    device: str = "auto",
    half: bool = False,
    attribution: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_cut: Callable[[int, int], None] | None = None,
    on_step: Callable[[Step], None] | None = None,
    on_epoch: Callable[[Epoch], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    recipe = recipe or Recipe()
    recipe.check()
    out = Path(out)
    check_output(out, resume=resume, overwrite=overwrite)  # before any tile is cut
    try:
        config, network = model_config_for(
            arch=arch,
            encoder=encoder,
            decoder_channels=decoder_channels,
            classes=classes,
            mpp=mpp,
            tile=tile,
            overlap=overlap,
            input_size=input_size,
            init=Path(init) if init else None,
        )
    except ModelError as exc:
        raise TrainingError(str(exc)) from None
    tiles = cut_tiles(
        items,
        classes=config.classes,
        mpp=config.mpp,
        tile=config.tile_size,
        overlap=config.overlap,
        input_size=config.input_size,
        class_map=class_map,
        image_mpp=image_mpp,
        allow_empty=allow_empty,
        oversample=oversample,
        progress=on_cut,
    )
    provenance = {
        "made_by": f"nephro train (napari-nephro {__version__})",
        "data": {**(data or {}), "items": [i.name for i in items]},
        "class_map": dict(class_map or {}),
        "oversample": dict(oversample or {}),
        "started_from": str(init) if init else "random weights",
    }
    if attribution:
        provenance["data_attribution"] = attribution
    return train(
        tiles,
        config,
        out,
        recipe=recipe,
        network=network,
        device=device,
        resume=resume,
        overwrite=overwrite,
        provenance=provenance,
        half=half,
        on_step=on_step,
        on_epoch=on_epoch,
        stop=stop,
    )


__all__ = ["model_config_for", "train_from_files", "train_items"]
