"""StarDist fine-tuned on a review training set by StarDist's own `train`, in a TensorFlow process of its own.

TensorFlow never runs in napari-nephro's process (importing torchvision after it
is a segmentation fault; see `models.stardist_adapter`): the training runs in
`_stardist_train_worker.py`, started as a script, fed over its stdin with the
adapter's messages of plain data and raw arrays (`models._stardist_worker.send` /
`receive`), and it reports every step and epoch back. Stopping kills it; nothing
it wrote is kept.

The patches are read at the adapter's working scale (0.5 um/px). StarDist's
`train` has no per-image weight: the images of every step are drawn here
beforehand, with probability proportional to the pair's weight times its area,
and StarDist gets that list (one entry per image it will see; the pixels are
sent once). Whole patches are held out for StarDist's validation, which picks
`weights_best.h5`; the thresholds of the source folder are kept.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import deque
from pathlib import Path

import numpy as np

from ..common.atomic import atomic_output
from .finetune import (
    VAL_FRACTION,
    FinetuneEpoch,
    Settings,
    Stopped,
    draw_weights,
    nucleus_images,
    review_block,
    spec_path,
    write_sidecar,
)
from .layout import ReviewError

DEFAULT = Settings(epochs=10, steps_per_epoch=25, batch_size=4, crop=256, lr=1e-4)
WORKER = Path(__file__).with_name("_stardist_train_worker.py")


def finetune_stardist(tset, spec, out: Path, settings: Settings, *, device, progress, on_epoch, stop) -> Path:
    from ..models import stardist_adapter as sa
    from ..models.errors import ModelError
    from ..training.data import split_by_group

    if settings.freeze_encoder:
        raise ReviewError("StarDist has no separate encoder to freeze: fine-tune it whole")
    try:
        target = sa._target(device)
        folder = sa.find_folder(spec_path(spec, "stardist"))
        config = sa.read_config(folder)
        weights = sa.weights_in(folder)
    except ModelError as exc:
        raise ReviewError(str(exc)) from None
    s = settings.filled(DEFAULT)
    divisor = max(config.get("grid", [1, 1])) * 2 ** int(config.get("unet_n_depth", 3))
    if s.crop % divisor:
        raise ReviewError(f"the crop must be a multiple of {divisor} px for this StarDist model, not {s.crop}")
    images = nucleus_images(tset, sa.DEFAULT_MPP)
    train, val = split_by_group([p.patch for p in tset.pairs], VAL_FRACTION, s.seed)
    shares = draw_weights(tset, images)[train]
    rng = np.random.default_rng(s.seed)
    draws = rng.choice(train, size=s.epochs * s.steps_per_epoch * s.batch_size, p=shares / shares.sum())
    recipe = {
        **{k: getattr(s, k) for k in ("epochs", "steps_per_epoch", "batch_size", "crop", "lr", "seed")},
        "mpp": sa.DEFAULT_MPP,
        "validation": sorted(tset.pairs[i].patch for i in val),
        "normalisation": {"percentiles": list(sa.PERCENTILES), "min_range": sa.MIN_RANGE},
        "thresholds": "kept from the source model",
    }
    block = review_block(tset, recipe)
    request = {
        "source": str(folder.resolve()),
        "weights": weights.name,
        "device": target,
        "images": [np.ascontiguousarray(im.image) for im in images],
        "labels": [np.ascontiguousarray(im.labels, np.int32) for im in images],
        "draws": draws.astype(np.int64),
        "val": np.asarray(val, np.int64),
        "epochs": s.epochs,
        "steps": s.steps_per_epoch,
        "batch": s.batch_size,
        "crop": s.crop,
        "lr": s.lr,
        "seed": s.seed,
        "percentiles": list(sa.PERCENTILES),
        "min_range": sa.MIN_RANGE,
    }
    with atomic_output(out) as tmp:
        _train(request | {"out": str(tmp.resolve())}, s, progress, on_epoch, stop)
        if (folder / "thresholds.json").is_file():
            shutil.copyfile(folder / "thresholds.json", tmp / "thresholds.json")
    write_sidecar(out, str(spec), "stardist", block)
    return out


def _train(request: dict, s: Settings, progress, on_epoch, stop) -> dict:
    """Run the worker to its end, passing its reports on; a stop kills it, a death is one line."""
    from ..models._stardist_worker import receive, send
    from ..models.stardist_adapter import _not_installed, spawn

    process, tail = spawn(WORKER)
    total = s.epochs * s.steps_per_epoch
    try:
        try:
            send(process.stdin, ("train", request))
            process.stdin.close()
        except OSError:
            raise _died(process, tail) from None
        while True:
            try:
                message = receive(process.stdout)
            except (EOFError, OSError, ValueError):
                raise _died(process, tail) from None
            kind = message[0]
            if kind == "step":
                info = message[1]
                if progress is not None:
                    progress((info["epoch"] - 1) * s.steps_per_epoch + info["step"], total)
                if stop is not None and stop():
                    raise Stopped
            elif kind == "epoch":
                info = message[1]
                if on_epoch is not None:
                    on_epoch(FinetuneEpoch(info["epoch"], info["loss"], info.get("val_loss"), info["seconds"]))
            elif kind == "done":
                return message[1]
            else:
                _, why, text = message
                if why == "missing":
                    raise ReviewError(str(_not_installed(text.split(":")[0])))
                raise ReviewError(f"StarDist fine-tuning failed in its TensorFlow process: {text}")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None and not stream.closed:
                stream.close()


def _died(process: subprocess.Popen, tail: deque) -> ReviewError:
    code = process.wait()
    last = next((line.strip() for line in reversed(tail) if line.strip()), "")
    said = f"; its last words: {last[:200]}" if last else ""
    return ReviewError(f"StarDist's TensorFlow process stopped while fine-tuning (exit code {code}){said}")
