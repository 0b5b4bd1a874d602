"""Cellpose fine-tuned on a review training set by cellpose's own `train.train_seg`.

Both nets our adapter runs are trained: the classic U-Net (ours, `cellpose_classic`,
since cellpose 4 no longer ships it) and Cellpose-SAM (cellpose 4's `CPSAM`). The
patches are read at the model's working scale (`cellpose_adapter`: the typical
nucleus diameter over the net's), and prepared as the adapter prepares tiles:
the classic net gets the grey, 1-99 % normalised, inverted image (`classic_input`),
Cellpose-SAM the RGB patch, normalised by cellpose. `rescale` is off: the
patches are at the net's scale already.

How `train_seg` is driven:
- one cellpose "epoch" is one of our steps (`nimg_per_epoch` = the batch size),
  so `train_probs`, cellpose's per-image sampling probabilities, pick every
  batch: a pair is drawn with probability proportional to its weight times its
  area (cellpose uses them only when an epoch is smaller than the image list; a
  list exactly one batch long is given twice). Its schedule then warms the rate
  up over the first 10 steps, starting from 0.
- no test images: cellpose only logs their loss, it keeps the last weights
  whatever it is, so held-out patches would be lost to training.
- the net is wrapped (`_Watched`) to count steps (progress, stop) and to give
  the classic net its own input channels out of cellpose's three.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..common.atomic import atomic_output
from .finetune import (
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

CLASSIC = Settings(epochs=10, steps_per_epoch=25, batch_size=8, crop=224, lr=1e-4)
SAM = Settings(epochs=10, steps_per_epoch=25, batch_size=4, crop=256, lr=1e-5)  # cellpose's own rate for cpsam
WEIGHT_DECAY = {"classic": 1e-5, "sam": 0.1}  # Cellpose 3's and cellpose 4's defaults
SAM_CROP = 256  # train_seg refuses any other block size for Cellpose-SAM


class _Watched(nn.Module):
    """The net as `train_seg` sees it: its steps counted, saved as the inner net's own state dict.

    `channels`: the classic net's input channels, cut from the three cellpose makes.
    """

    def __init__(self, net: nn.Module, channels: int | None, on_step, stop) -> None:
        super().__init__()
        self.net = net
        self.channels, self.on_step, self.stop = channels, on_step, stop
        self.steps = 0

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self.net, "dtype", torch.float32)

    @dtype.setter
    def dtype(self, value: torch.dtype) -> None:  # train_seg trains a bfloat16 Cellpose-SAM in float32
        if hasattr(type(self.net), "dtype"):
            self.net.dtype = value
        else:
            self.net.to(value)

    @property
    def backbone(self) -> str:
        return getattr(self.net, "backbone", "classic")

    @property
    def diam_labels(self) -> nn.Parameter:
        return self.net.diam_labels

    @property
    def diam_mean(self) -> nn.Parameter:
        return self.net.diam_mean

    def forward(self, x: torch.Tensor):
        if self.training:
            if self.stop is not None and self.stop():
                raise Stopped
            self.steps += 1
            if self.on_step is not None:
                self.on_step(self.steps)
        if self.channels is not None:
            x = x[:, : self.channels]
        return self.net(x)

    def save_model(self, filename) -> None:
        torch.save(self.net.state_dict(), filename)


def finetune_cellpose(tset, spec, out: Path, settings: Settings, *, device, progress, on_epoch, stop) -> Path:
    from cellpose import train as cp_train

    from ..models import cellpose_adapter as ca
    from ..models.cellpose_classic import classic_input
    from ..models.checkpoint import count_nonfinite
    from ..models.errors import ModelError

    try:
        segmenter = ca.load(spec_path(spec, "cellpose"), device=device)
    except ModelError as exc:
        raise ReviewError(str(exc)) from None
    sam = isinstance(segmenter, ca.CellposeSAMSegmenter)
    s = settings.filled(SAM if sam else CLASSIC)
    if sam:
        net, channels = segmenter.model.net, None
        if s.crop != SAM_CROP:
            raise ReviewError(f"Cellpose-SAM trains on {SAM_CROP} px crops only (cellpose's rule), not {s.crop}")
    else:
        net, channels = segmenter.network, segmenter.network.nbase[0]
        if s.crop % net.multiple or s.crop < 2 * net.multiple:
            raise ReviewError(f"the crop must be a multiple of {net.multiple} px for this Cellpose net, not {s.crop}")
    images = nucleus_images(tset, segmenter.mpp)
    if sam:
        data, axis, normalize = [im.image for im in images], 2, {"normalize": True}
    else:
        data = [classic_input(im.image, nchan=channels, invert=segmenter.invert) for im in images]
        axis, normalize = 0, {"normalize": False}  # a dict: cellpose would write a bool into its own defaults
    labels = [im.labels for im in images]
    probs = draw_weights(tset, images)
    if len(data) == s.batch_size:  # an epoch as long as the list is a permutation: the probabilities would go unused
        data, labels, probs = data * 2, labels * 2, np.concatenate([probs, probs])
    if s.freeze_encoder:
        (net.encoder if sam else net.downsample).requires_grad_(False)
    steps = s.epochs * s.steps_per_epoch
    times: list[float] = []

    def on_step(done: int) -> None:
        times.append(time.perf_counter())
        if progress is not None:
            progress(done, steps)

    watched = _Watched(net, channels, on_step, stop)
    kind = "sam" if sam else "classic"
    recipe = {
        **asdict(s),
        "weight_decay": WEIGHT_DECAY[kind],
        "net": "Cellpose-SAM" if sam else "classic Cellpose U-Net",
        "mpp": segmenter.mpp,
        "train_seg": {"n_epochs": steps, "nimg_per_epoch": s.batch_size, "bsize": s.crop, "rescale": False},
    }
    block = review_block(tset, recipe)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Aa]utocast.*")  # float32 on a CPU: cellpose asks anyway
        filename, losses, _ = cp_train.train_seg(
            watched,
            train_data=data,
            train_labels=labels,
            train_probs=probs.astype(np.float64),
            channel_axis=axis,
            normalize=normalize,
            batch_size=s.batch_size,
            learning_rate=s.lr,
            weight_decay=WEIGHT_DECAY[kind],
            n_epochs=steps,
            save_path=tmp,
            save_every=steps + 1,
            nimg_per_epoch=s.batch_size,
            min_train_masks=0,  # a patch without nuclei is a negative, and the probabilities stay aligned
            bsize=s.crop,
            rescale=False,
            model_name="model",
        )
        losses = np.asarray(losses, np.float64)
        if not np.isfinite(losses).all() or count_nonfinite(net.state_dict()):
            raise ReviewError(
                f"Cellpose fine-tuning diverged (the loss is not finite); lower the learning rate ({s.lr:g})"
            )
        with atomic_output(out) as dest:
            shutil.copyfile(filename, dest)
    write_sidecar(out, str(spec), "cellpose", block)
    if on_epoch is not None:  # train_seg gives its losses when it returns: the epochs are told then
        ends = [started, *times]
        for epoch in range(s.epochs):
            part = losses[epoch * s.steps_per_epoch : (epoch + 1) * s.steps_per_epoch]
            last = min((epoch + 1) * s.steps_per_epoch, len(ends) - 1)
            seconds = ends[last] - ends[epoch * s.steps_per_epoch] if last else 0.0
            on_epoch(FinetuneEpoch(epoch + 1, float(part.mean()) if part.size else math.nan, None, seconds))
    return out
