"""Training a HoVer-style nuclei network: nuclear probability + horizontal-vertical maps from instance labels.

Each step draws random crops from whole images (`nuclei_data`), augments image
and instance labels together (flips, rotations, shift-scale-rotate, HED stain
jitter, colour, blur, noise: `augment.Augment`), and only then makes the targets,
so every nucleus's HV map is exact for the pixels the network sees
(`models.hovernet.hv_targets`). The loss is HoVer-Net's (Graham et al. 2019):
binary cross-entropy + soft Dice on the nuclear probability, mean squared error
on the HV maps, and the mean squared error of their gradients inside nuclei
(MSGE; Sobel 5x5), which sharpens the jump between touching nuclei.

The best epoch is the one with the highest instance F1 (IoU 0.5) on the
validation images, segmented whole with the same post-processing as the engine
(`hover_instances`); aggregated Jaccard is recorded beside it. The run keeps its
state after every epoch exactly as the glomerulus loop does (`loop._save_state`),
so an interrupted run resumes and ends with the same weights as one that never
stopped. The same loop fine-tunes CellViT (`network=` a `CellViT`; its outputs
are read through `hover_outputs`).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import ModelConfig
from ..models.checkpoint import count_nonfinite, save_checkpoint
from ..models.device import pick_device
from ..models.errors import ModelError
from ..models.hover_segmenter import normalise, post_processing
from ..models.hovernet import HoverParams, hv_targets
from .augment import Augment
from .errors import TrainingError
from .loop import (
    METRICS,
    Step,
    _diverged,
    _kept_only_when_resumable,
    _load_state,
    _nonfinite_moments,
    _read_weights,
    _schedule,
    _zoom,
    check_output,
    record_epoch,
)
from .nuclei_data import NucleusImage, split_images

BLUR = 0.5  # chance of a blurred crop: scans of nuclei are often a little out of focus
SOBEL5 = (  # HoVer-Net's 5x5 Sobel for the MSGE term: d/dx; d/dy is its transpose
    (-0.25, -0.2, 0.0, 0.2, 0.25),
    (-0.4, -0.5, 0.0, 0.5, 0.4),
    (-0.5, -1.0, 0.0, 1.0, 0.5),
    (-0.4, -0.5, 0.0, 0.5, 0.4),
    (-0.25, -0.2, 0.0, 0.2, 0.25),
)


@dataclass
class NucleiRecipe:
    """How to train a nuclei network; the defaults made the shipped model (see docs/models.md)."""

    epochs: int = 36
    steps_per_epoch: int = 50  # crops are drawn at random, so an "epoch" is a number of steps
    batch_size: int = 16
    crop: int = 192  # px at the working scale; a multiple of 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    val_fraction: float = 0.15
    freeze_encoder: bool = False
    augment: bool = True
    stain_jitter: float = 0.4  # wider than the glomerulus recipe's: H&E intensity varies most between labs
    scale_jitter: float = 0.3
    hv_weight: float = 2.0  # of the HV mean squared error, beside BCE + Dice (HoVer-Net: 1; CellViT: 2.5)
    msge_weight: float = 1.0

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.steps_per_epoch < 1:
            raise TrainingError("epochs, steps per epoch and batch size must be at least 1")
        if self.crop < 64 or self.crop % 32:
            raise TrainingError(f"the crop must be a multiple of 32 px from 64, not {self.crop}")
        if not (0 < self.lr < math.inf and 0 <= self.weight_decay < math.inf):
            raise TrainingError("the learning rate must be positive and the weight decay not negative")
        if not (0 <= self.stain_jitter <= 1 and 0 <= self.scale_jitter <= 3):
            raise TrainingError("the stain jitter must be in [0, 1] and the scale jitter in [0, 3]")
        if not 0 < self.val_fraction < 1:
            raise TrainingError(f"the validation fraction must be between 0 and 1, not {self.val_fraction}")
        if not (self.hv_weight >= 0 and self.msge_weight >= 0):
            raise TrainingError("loss weights must not be negative")


@dataclass
class NucleiEpoch:
    epoch: int
    train_loss: float
    val_loss: float
    val_f1: float  # instance F1 at IoU 0.5 over all validation images
    val_aji: float  # aggregated Jaccard index over all validation images
    lr: float
    seconds: float


@dataclass
class NucleiTrainResult:
    path: Path | None  # None when stopped early (resume to finish)
    best_epoch: int
    best_f1: float
    history: list[NucleiEpoch] = field(default_factory=list)


def hover_outputs(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) nuclear logit and (N, 2, H, W) HV maps from our network's 3 channels or CellViT's dict."""
    if isinstance(out, dict):  # CellViT: two-class softmax -> the log-odds of the nucleus class
        binary = out["nuclei_binary_map"]
        return binary[:, 1] - binary[:, 0], out["hv_map"]
    return out[:, 0], out[:, 1:3]


class HoverLoss(nn.Module):
    """BCE + soft Dice on the nuclear map, weighted MSE + MSGE on the HV maps (the gradients inside nuclei)."""

    def __init__(self, hv_weight: float = 2.0, msge_weight: float = 1.0) -> None:
        super().__init__()
        self.hv_weight, self.msge_weight = hv_weight, msge_weight
        dx = torch.tensor(SOBEL5, dtype=torch.float32)
        self.register_buffer("kernels", torch.stack([dx, dx.T]).unsqueeze(1))  # (2, 1, 5, 5): d/dx, d/dy

    def forward(self, logit: torch.Tensor, hv: torch.Tensor, fg: torch.Tensor, hv_true: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logit, fg)
        prob = torch.sigmoid(logit)
        dice = 1 - (2 * (prob * fg).sum() + 1) / (prob.sum() + fg.sum() + 1)
        mse = F.mse_loss(hv, hv_true)
        loss = bce + dice + self.hv_weight * mse
        if self.msge_weight:
            grads = self._gradients(hv) - self._gradients(hv_true)
            inside = fg.unsqueeze(1)
            loss = loss + self.msge_weight * (grads.square() * inside).sum() / (2 * inside.sum() + 1e-8)
        return loss

    def _gradients(self, hv: torch.Tensor) -> torch.Tensor:
        """(N, 2, H, W): d(horizontal)/dx and d(vertical)/dy."""
        h = F.conv2d(hv[:, :1], self.kernels[:1], padding=2)
        v = F.conv2d(hv[:, 1:2], self.kernels[1:], padding=2)
        return torch.cat([h, v], dim=1)


def targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S) instance labels -> (N, S, S) float foreground and (N, 2, S, S) HV targets."""
    return (labels > 0).astype(np.float32), np.stack([hv_targets(lab) for lab in labels])


def _crop(image: NucleusImage, size: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random `size` crop (white / background beyond a smaller image)."""
    h, w = image.labels.shape
    y = int(torch.randint(0, max(1, h - size + 1), (), generator=generator))
    x = int(torch.randint(0, max(1, w - size + 1), (), generator=generator))
    rgb = np.full((size, size, 3), 255, np.uint8)
    lab = np.zeros((size, size), np.int32)
    part = image.image[y : y + size, x : x + size]
    rgb[: part.shape[0], : part.shape[1]] = part
    lab[: part.shape[0], : part.shape[1]] = image.labels[y : y + size, x : x + size]
    return rgb, lab


def draw_batch(
    images: list[NucleusImage],
    weights: torch.Tensor,
    recipe: NucleiRecipe,
    generator: torch.Generator,
    augment: Augment | None,
) -> tuple[torch.Tensor, np.ndarray]:
    """(N, 3, S, S) float images in [0, 1] and (N, S, S) instance labels, after augmentation."""
    picks = torch.multinomial(weights, recipe.batch_size, replacement=True, generator=generator)
    xs, labels = [], []
    for index in picks.tolist():
        rgb, lab = _crop(images[index], recipe.crop, generator)
        image = torch.from_numpy(rgb).permute(2, 0, 1)
        mask = torch.from_numpy(lab)
        if augment is None:
            xs.append(image.float() / 255)
            labels.append(lab)
        else:
            x, m = augment(image, mask)
            xs.append(x)
            labels.append(m.numpy().astype(np.int32))
    return torch.stack(xs), np.stack(labels)


def train_nuclei(
    images: list[NucleusImage],
    model_config: ModelConfig,
    out: str | Path,
    *,
    recipe: NucleiRecipe | None = None,
    network: nn.Module | None = None,
    save: Callable[[nn.Module, Path], None] | None = None,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    provenance: dict | None = None,
    image_weights: Sequence[float] | None = None,
    on_step: Callable[[Step], None] | None = None,
    on_epoch: Callable[[NucleiEpoch], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> NucleiTrainResult:
    """Train `network` (fresh from `model_config`, heads "hover", when None) on `images`; best epoch to `out`.

    `save(network, out)` writes the result for a network that is not ours (CellViT);
    by default a checkpoint folder (`config.json` + `model.safetensors`).
    `image_weights` (one per image, default all 1) scale how often each training
    image's crops are drawn beyond its area: a review set's oversampling weights.
    """
    from ..models.networks import build_network

    recipe = recipe or NucleiRecipe()
    recipe.check()
    if model_config.heads != "hover":
        raise TrainingError("a nuclei network needs heads 'hover' in its config")
    factors = _image_weights(images, image_weights)
    out = Path(out)
    state_dir = check_output(out, resume=resume, overwrite=overwrite)
    train_index, val_index = split_images(images, recipe.val_fraction, recipe.seed)
    train_set = [images[i] for i in train_index]
    val_set = [images[i] for i in val_index]
    counts = {"train": len(train_set), "validation": len(val_set)}
    target = pick_device(device)
    torch.manual_seed(recipe.seed)
    network = (network if network is not None else build_network(model_config)).to(target)
    encoder = getattr(network, "encoder", None)
    if recipe.freeze_encoder:
        if encoder is None:
            raise TrainingError("this network has no separate encoder to freeze")
        encoder.requires_grad_(False)
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe, recipe.steps_per_epoch))
    loss_fn = HoverLoss(recipe.hv_weight, recipe.msge_weight).to(target)
    generator = torch.Generator().manual_seed(recipe.seed)
    history: list[NucleiEpoch] = []
    best = (0, -1.0)
    first_epoch = 1
    if resume:
        first_epoch, history, best = _load_state(
            state_dir, network, optimizer, scheduler, generator, recipe, counts, NucleiEpoch
        )
    else:
        if state_dir.exists():
            shutil.rmtree(state_dir)
        state_dir.mkdir()
        import json

        (state_dir / "recipe.json").write_text(json.dumps({**asdict(recipe), "tiles": counts}, indent=2))
    # images drawn in proportion to their area (every pixel of the data is as likely to be seen), times their weight
    weights = torch.tensor([float(images[i].labels.size) * factors[i] for i in train_index], dtype=torch.float64)
    mean = torch.tensor(model_config.normalization["mean"], device=target).view(1, 3, 1, 1)
    std = torch.tensor(model_config.normalization["std"], device=target).view(1, 3, 1, 1)
    params_post = post_processing(model_config.mpp, model_config.post_processing)
    with _kept_only_when_resumable(state_dir):
        augment = Augment(recipe.stain_jitter, _zoom(recipe.scale_jitter), blur=BLUR) if recipe.augment else None
        stopped = False
        for epoch in range(first_epoch, recipe.epochs + 1):
            started = time.perf_counter()
            network.train()
            if recipe.freeze_encoder:
                encoder.eval()
            total = 0.0
            for step in range(recipe.steps_per_epoch):
                if stop is not None and stop():
                    stopped = True
                    break
                x, labels = draw_batch(train_set, weights, recipe, generator, augment)
                fg, hv_true = targets(labels)
                logit, hv = hover_outputs(network(normalise(x.to(target), model_config.normalization, mean, std)))
                loss = loss_fn(logit, hv, torch.from_numpy(fg).to(target), torch.from_numpy(hv_true).to(target))
                value = loss.item()
                if not math.isfinite(value):
                    raise _diverged(state_dir, recipe, f"epoch {epoch}, step {step + 1}", f"the loss is {value}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += value
                if on_step is not None:
                    on_step(Step(epoch, step + 1, recipe.steps_per_epoch, value))
            if stopped:
                break
            val_loss, f1, aji = validate(
                network, val_set, loss_fn, target, mean, std, params_post, model_config.normalization
            )
            if not math.isfinite(val_loss):
                raise _diverged(state_dir, recipe, f"epoch {epoch}", f"the validation loss is {val_loss}")
            bad = count_nonfinite(network.state_dict()) or _nonfinite_moments(optimizer)
            if bad:
                raise _diverged(state_dir, recipe, f"epoch {epoch}", f"{bad} weight or moment tensors are not finite")
            report = NucleiEpoch(
                epoch,
                total / recipe.steps_per_epoch,
                val_loss,
                f1,
                aji,
                scheduler.get_last_lr()[0],
                time.perf_counter() - started,
            )
            best = record_epoch(
                state_dir, network, optimizer, scheduler, generator, history, best, report, f1, on_epoch
            )
        if stopped or len(history) < recipe.epochs:
            return NucleiTrainResult(None, best[0], best[1], history)
        network.load_state_dict(_read_weights(state_dir / "best.safetensors"))
        if save is not None:
            save(network, out)
        else:
            tuned = None
            if val_set:
                tuned = tune_post_processing(
                    network, val_set, target, mean, std, params_post, model_config.normalization
                )
            _save_ours(network, out, model_config, recipe, history, best, images, val_set, provenance, overwrite, tuned)
        shutil.copy(state_dir / METRICS, out / METRICS if out.is_dir() else out.with_suffix(".metrics.csv"))
        shutil.rmtree(state_dir)
        return NucleiTrainResult(out, best[0], best[1], history)


def _image_weights(images: list[NucleusImage], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(images)
    factors = [float(w) for w in weights]
    if len(factors) != len(images):
        raise TrainingError(f"{len(factors)} image weights for {len(images)} images")
    if not all(math.isfinite(w) and w > 0 for w in factors):
        raise TrainingError("image weights must be positive numbers")
    return factors


MARKER_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(9))  # 0.30 .. 0.70


@dataclass(frozen=True)
class TunedPostProcessing:
    """The marker threshold chosen on validation images, and the F1 it gave against the one it replaced."""

    marker_threshold: float
    f1: float
    f1_before: float
    grid: tuple[float, ...] = MARKER_GRID


def tune_post_processing(
    network, images, device, mean, std, start: HoverParams, normalization: dict | None = None
) -> TunedPostProcessing:
    """The HoVer marker threshold that gives the best instance F1 (IoU 0.5) on `images`.

    Why: HoVer-Net calls a pixel a border between nuclei where the min-max scaled HV
    gradient reaches 0.4. How steep a small network's HV maps are depends on its
    training, so the published 0.4 can leave touching nuclei merged or cut a nucleus
    into none: for the shipped model, 0.4 found 688 nuclei of 1,222 on NuInsSeg
    human kidney. The maps are computed once; each threshold of `MARKER_GRID` costs
    one post-processing pass. Ties keep the threshold nearest the starting one.
    """
    from ..evaluation.instances import match_instances
    from ..models.hovernet import hover_instances

    network.eval()
    maps = [(predict_maps(network, item.image, mean, std, device, normalization), item.labels) for item in images]
    grid = sorted({*MARKER_GRID, start.marker_threshold})
    scores = {}
    for marker in grid:
        params = HoverParams(**{**start.__dict__, "marker_threshold": marker})
        tp = fp = fn = 0
        for (prob, hv), truth in maps:
            match = match_instances(hover_instances(prob, hv, params=params).labels, truth)
            tp, fp, fn = tp + match.tp, fp + match.fp, fn + match.fn
        scores[marker] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    chosen = max(grid, key=lambda m: (round(scores[m], 6), -abs(m - start.marker_threshold)))
    return TunedPostProcessing(chosen, scores[chosen], scores[start.marker_threshold], tuple(grid))


def _save_ours(
    network, out, model_config, recipe, history, best, images, val_set, provenance, overwrite, tuned=None
) -> None:
    config = ModelConfig(**{**asdict(model_config), "provenance": {}})
    if tuned is not None:
        config.post_processing = {**(model_config.post_processing or {}), "marker_threshold": tuned.marker_threshold}
    config.provenance = {
        **model_config.provenance,
        **(provenance or {}),
        "recipe": asdict(recipe),
        "loss": "BCE + soft Dice (nuclear map) + MSE + MSGE (HV maps), HoVer-Net's",
        "optimizer": "AdamW, linear warm-up then cosine decay",
        "images": {
            "train+val": len(images),
            "nuclei": int(sum(n.count for n in images)),
            "validation": sorted(n.name for n in val_set),
        },
        "best_epoch": best[0],
        "val_f1": round(best[1], 4),
        "history": [asdict(e) for e in history],
    }
    if tuned is not None:
        config.provenance["post_processing"] = {
            "tuned_on": "the validation images",
            "marker_threshold_grid": list(tuned.grid),
            "val_f1_before": round(tuned.f1_before, 4),
            "val_f1": round(tuned.f1, 4),
        }
    try:
        save_checkpoint(network, config, out, overwrite=overwrite)
    except ModelError as exc:
        raise TrainingError(f"{exc}; finish with --resume") from None


@torch.inference_mode()
def predict_maps(network, image: np.ndarray, mean, std, device, normalization=None) -> tuple[np.ndarray, np.ndarray]:
    """Nuclear probability (H, W) and HV (2, H, W) of one whole image (padded to a multiple of 32)."""
    h, w = image.shape[:2]
    ph, pw = -h % 32, -w % 32
    x = torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1).float().div(255).unsqueeze(0).to(device)
    x = normalise(x, normalization or {}, mean, std)
    x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    logit, hv = hover_outputs(network(x))
    return torch.sigmoid(logit)[0, :h, :w].cpu().numpy(), hv[0, :, :h, :w].float().cpu().numpy()


def validate(
    network, images, loss_fn, device, mean, std, params: HoverParams, normalization: dict | None = None
) -> tuple[float, float, float]:
    """Mean loss, instance F1 (IoU 0.5) and aggregated Jaccard over whole validation images."""
    from ..evaluation.instances import aggregated_jaccard, match_instances
    from ..models.hovernet import hover_instances

    network.eval()
    losses, tp, fp, fn, inter, union = [], 0, 0, 0, 0.0, 0.0
    for item in images:
        prob, hv = predict_maps(network, item.image, mean, std, device, normalization)
        fg, hv_true = targets(item.labels[None])
        logit = torch.logit(torch.from_numpy(prob).clamp(1e-6, 1 - 1e-6))[None]
        with torch.inference_mode():
            losses.append(
                float(
                    loss_fn(
                        logit.to(device),
                        torch.from_numpy(hv)[None].to(device),
                        torch.from_numpy(fg).to(device),
                        torch.from_numpy(hv_true).to(device),
                    )
                )
            )
        found = hover_instances(prob, hv, params=params).labels
        match = match_instances(found, item.labels)
        tp, fp, fn = tp + match.tp, fp + match.fp, fn + match.fn
        i, u = aggregated_jaccard(found, item.labels, parts=True)
        inter, union = inter + i, union + u
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return float(np.mean(losses)), f1, (inter / union if union else 1.0)
