"""The training loop of the BMC Nephrology recipe: BCE (or cross-entropy) + Lovasz, AdamW, warm-up then cosine.

A run keeps its state in `<out>.training/` after every epoch (weights, optimiser,
schedule, random generators, metrics), so an interrupted run resumes from the
last finished epoch and ends as if it had never stopped. The result is a
checkpoint folder the engine loads, with the best epoch's weights (by validation
Dice) and a config that records how it was made.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_output
from ..models import ModelConfig
from ..models.checkpoint import save_checkpoint
from ..models.device import pick_device
from .augment import Augment
from .data import TileSet
from .errors import TrainingError

STATE = "state.pt"
METRICS = "metrics.csv"
FIELDS = ("epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds")


@dataclass
class Recipe:
    """How to train; defaults are the paper's."""

    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-4  # the peak, reached after the warm-up
    weight_decay: float = 1e-5
    warmup_epochs: float = 1.0
    seed: int = 0
    val_fraction: float = 0.2
    freeze_encoder: bool = False
    augment: bool = True

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainingError("epochs and batch size must be at least 1")
        if not self.lr > 0 or self.weight_decay < 0:
            raise TrainingError("the learning rate must be positive and the weight decay not negative")
        if not 0 < self.val_fraction < 1:
            raise TrainingError(f"the validation fraction must be between 0 and 1, not {self.val_fraction}")


@dataclass
class Epoch:
    epoch: int
    train_loss: float
    val_loss: float
    val_dice: float  # mean foreground Dice over the validation tiles' pixels
    lr: float
    seconds: float


@dataclass
class Step:
    epoch: int
    step: int
    steps: int
    loss: float


@dataclass
class TrainResult:
    path: Path | None  # the checkpoint; None when stopped early (resume to finish)
    best_epoch: int
    best_dice: float
    history: list[Epoch] = field(default_factory=list)


def dice_counts(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(2 x intersection, sum of sizes) of foreground (any class vs background; per class when several)."""
    if logits.shape[1] == 1:
        pred = logits[:, 0] > 0
        truth = target > 0
        return float(2 * (pred & truth).sum()), float(pred.sum() + truth.sum())
    pred = logits.argmax(1)
    inter = total = 0.0
    for c in range(1, logits.shape[1]):
        p, t = pred == c, target == c
        inter += float(2 * (p & t).sum())
        total += float(p.sum() + t.sum())
    return inter, total


class _Loss(nn.Module):
    """BCE + Lovasz hinge for one class; cross-entropy + Lovasz softmax for several."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        from segmentation_models_pytorch import losses

        self.binary = channels == 1
        if self.binary:
            self.first, self.lovasz = losses.SoftBCEWithLogitsLoss(), losses.LovaszLoss("binary")
        else:
            self.first, self.lovasz = nn.CrossEntropyLoss(), losses.LovaszLoss("multiclass")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.binary:
            target = (target > 0).float().unsqueeze(1)
        return self.first(logits, target) + self.lovasz(logits, target)


def _schedule(recipe: Recipe, steps_per_epoch: int):
    warmup = max(1, round(recipe.warmup_epochs * steps_per_epoch))
    total = max(warmup + 1, recipe.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return factor


def check_output(out: Path, *, resume: bool, overwrite: bool) -> Path:
    """Refuse an output that exists, an unfinished run not resumed, a resume of nothing; the state folder."""
    state_dir = out.with_name(out.name + ".training")
    if out.exists() and not overwrite:
        raise TrainingError(f"{out}: already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise TrainingError(f"{out}: folder {out.parent} does not exist")
    if resume and not (state_dir / STATE).exists():
        raise TrainingError(f"{out}: nothing to resume (no {state_dir.name})")
    if (state_dir / STATE).exists() and not resume and not overwrite:  # a folder without it finished no epoch
        raise TrainingError(
            f"{out}: an unfinished training run is in {state_dir.name}; pass --resume to finish it "
            "or --overwrite to start again"
        )
    return state_dir


def train(
    tiles: TileSet,
    model_config: ModelConfig,
    out: str | Path,
    *,
    recipe: Recipe | None = None,
    network: nn.Module | None = None,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    provenance: dict | None = None,
    half: bool = False,
    on_step: Callable[[Step], None] | None = None,
    on_epoch: Callable[[Epoch], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train `network` (fresh from `model_config` when None) on `tiles`; write the best epoch to `out`."""
    from ..models.networks import build_network
    from .data import split_by_group

    recipe = recipe or Recipe()
    recipe.check()
    out = Path(out)
    state_dir = check_output(out, resume=resume, overwrite=overwrite)
    if state_dir.exists() and not resume:
        shutil.rmtree(state_dir)  # an unfinished run the user asked to overwrite, or one that finished no epoch
    if list(tiles.classes) != list(model_config.classes):
        raise TrainingError(f"the tiles' classes {tiles.classes} differ from the model's {model_config.classes}")
    if tiles.images.shape[1] != model_config.input_size:
        raise TrainingError(f"tiles are {tiles.images.shape[1]} px, the network takes {model_config.input_size} px")

    target = pick_device(device)
    torch.manual_seed(recipe.seed)
    network = (network if network is not None else build_network(model_config)).to(target)
    if recipe.freeze_encoder:
        encoder = getattr(network, "encoder", None)
        if encoder is None:
            raise TrainingError(f"a {model_config.arch} has no separate encoder to freeze")
        encoder.requires_grad_(False)
    train_index, val_index = split_by_group(tiles.groups, recipe.val_fraction, recipe.seed)
    train_set, val_set = tiles.subset(train_index), tiles.subset(val_index)
    steps_per_epoch = max(1, math.ceil(len(train_set) / recipe.batch_size))
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe, steps_per_epoch))
    loss_fn = _Loss(model_config.out_channels)
    sampler_generator = torch.Generator().manual_seed(recipe.seed)
    history: list[Epoch] = []
    best = (0, -1.0)
    first_epoch = 1
    if resume:
        first_epoch, history, best = _load_state(state_dir, network, optimizer, scheduler, sampler_generator, recipe)
    else:
        state_dir.mkdir()
        (state_dir / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    mean = torch.tensor(model_config.normalization["mean"], device=target).view(1, 3, 1, 1)
    std = torch.tensor(model_config.normalization["std"], device=target).view(1, 3, 1, 1)
    augment = Augment() if recipe.augment else None
    stopped = False
    for epoch in range(first_epoch, recipe.epochs + 1):
        started = time.perf_counter()
        network.train()
        if recipe.freeze_encoder:
            network.encoder.eval()  # frozen batch-norm statistics too
        weights = torch.as_tensor(train_set.weights, dtype=torch.float64)
        order = torch.multinomial(
            weights, len(train_set), replacement=bool((weights != 1).any()), generator=sampler_generator
        )
        total_loss, seen = 0.0, 0
        for step in range(steps_per_epoch):
            if stop is not None and stop():
                stopped = True
                break
            index = order[step * recipe.batch_size : (step + 1) * recipe.batch_size].numpy()
            x, y = _batch(train_set, index, augment)
            x = ((x.to(target)) - mean) / std
            logits = network(x)
            loss = loss_fn(logits, y.to(target))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(index)
            seen += len(index)
            if on_step is not None:
                on_step(Step(epoch, step + 1, steps_per_epoch, float(loss.detach())))
        if stopped:
            break
        val_loss, val_dice = _validate(network, val_set, loss_fn, recipe.batch_size, target, mean, std)
        report = Epoch(
            epoch,
            total_loss / max(seen, 1),
            val_loss,
            val_dice,
            scheduler.get_last_lr()[0],
            time.perf_counter() - started,
        )
        history.append(report)
        if val_dice > best[1]:
            best = (epoch, val_dice)
            _save_weights(network, state_dir / "best.safetensors")
        _save_state(state_dir, network, optimizer, scheduler, sampler_generator, epoch, history, best)
        if on_epoch is not None:
            on_epoch(report)
    if stopped or len(history) < recipe.epochs:
        return TrainResult(None, best[0], best[1], history)
    return _finish(out, state_dir, model_config, recipe, history, best, tiles, provenance or {}, overwrite, half)


def _batch(tiles: TileSet, index: np.ndarray, augment: Augment | None) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(tiles.images[index]).permute(0, 3, 1, 2)
    masks = torch.from_numpy(tiles.masks[index])
    if augment is None:
        return images.float() / 255, masks.long()
    pairs = [augment(i, m) for i, m in zip(images, masks, strict=True)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@torch.inference_mode()
def _validate(network, tiles: TileSet, loss_fn, batch_size, device, mean, std) -> tuple[float, float]:
    network.eval()
    total_loss, inter, size = 0.0, 0.0, 0.0
    for start in range(0, len(tiles), batch_size):
        index = np.arange(start, min(start + batch_size, len(tiles)))
        x, y = _batch(tiles, index, None)
        x, y = ((x.to(device)) - mean) / std, y.to(device)
        logits = network(x)
        total_loss += float(loss_fn(logits, y)) * len(index)
        i, s = dice_counts(logits, y)
        inter, size = inter + i, size + s
    return total_loss / max(len(tiles), 1), (inter / size if size else 1.0)


def _save_weights(network: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(state, str(tmp))


def _save_state(state_dir, network, optimizer, scheduler, generator, epoch, history, best) -> None:
    """Everything a resumed run needs, replaced atomically after each epoch."""
    _save_weights(network, state_dir / "last.safetensors")
    state = {
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "sampler_rng": generator.get_state(),
        "best": list(best),
    }
    with atomic_output(state_dir / STATE) as tmp:
        torch.save(state, tmp)
    _write_metrics(state_dir / METRICS, history)


def _load_state(state_dir, network, optimizer, scheduler, generator, recipe):
    from safetensors.torch import load_file

    saved = json.loads((state_dir / "recipe.json").read_text())
    if saved != asdict(recipe):
        changed = sorted(k for k in saved if saved[k] != asdict(recipe).get(k))
        raise TrainingError(
            f"{state_dir}: was started with a different {', '.join(changed)}; resume with the same settings"
        )
    state = torch.load(state_dir / STATE, weights_only=True)  # our own file, and still nothing but tensors is unpickled
    network.load_state_dict(load_file(str(state_dir / "last.safetensors")))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    generator.set_state(state["sampler_rng"])
    history = _read_metrics(state_dir / METRICS)
    return state["epoch"] + 1, history, tuple(state["best"])


def _write_metrics(path: Path, history: list[Epoch]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS)
    writer.writeheader()
    for e in history:
        writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(e).items()})
    with atomic_output(path) as tmp:
        tmp.write_text(text.getvalue())


def _read_metrics(path: Path) -> list[Epoch]:
    with open(path, newline="") as f:
        return [Epoch(int(r["epoch"]), *(float(r[k]) for k in FIELDS[1:])) for r in csv.DictReader(f)]


def _finish(out, state_dir, model_config, recipe, history, best, tiles, provenance, overwrite, half) -> TrainResult:
    from safetensors.torch import load_file

    from ..models.networks import build_network

    network = build_network(model_config)
    network.load_state_dict(load_file(str(state_dir / "best.safetensors")))
    config = ModelConfig(**{**asdict(model_config), "provenance": {}})
    config.provenance = {
        **model_config.provenance,
        **provenance,
        "recipe": asdict(recipe),
        "loss": "BCE + Lovasz" if model_config.out_channels == 1 else "cross-entropy + Lovasz",
        "optimizer": "AdamW, linear warm-up then cosine decay",
        "tiles": {"train+val": len(tiles), "sources": sorted(set(tiles.groups)), "class_pixels": tiles.class_pixels()},
        "best_epoch": best[0],
        "val_dice": round(best[1], 4),
        "history": [asdict(e) for e in history],
    }
    save_checkpoint(network, config, out, overwrite=overwrite, half=half)
    shutil.copy(state_dir / METRICS, out / METRICS)
    shutil.rmtree(state_dir)
    return TrainResult(out, best[0], best[1], history)
