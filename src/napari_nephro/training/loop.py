"""The training loop: BCE (or cross-entropy) + Dice or Lovasz, AdamW, warm-up then cosine.

The BMC Nephrology recipe pairs BCE with the Lovasz hinge, from ImageNet weights.
From random weights (all we have offline) the Lovasz hinge stalls: on the default
model's data its training loss stayed at 1.6 for 50 epochs while BCE + soft Dice fell
steadily, so soft Dice is the default and Lovasz an option (`loss="lovasz"`).

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
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..common.atomic import atomic_output
from ..models import ModelConfig, ModelError
from ..models.checkpoint import count_nonfinite, save_checkpoint
from ..models.device import pick_device
from .augment import SCALE_JITTER, STAIN_JITTER, Augment
from .data import TileSet
from .errors import STATE, TrainingError
from .errors import state_dir as training_state_dir

METRICS = "metrics.csv"
LOSSES = ("dice", "lovasz")
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
    loss: str = "dice"  # the second term beside BCE / cross-entropy: "dice" or "lovasz" (the paper's)
    stain_jitter: float = STAIN_JITTER  # each HED stain's amount scaled by 1 +- this (0: off)
    scale_jitter: float = SCALE_JITTER  # zoom between 1 / (1 + this) and 1 + this (0: 0.9 to 1.1 at least)

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainingError("epochs and batch size must be at least 1")
        if not (0 < self.lr < math.inf and 0 <= self.weight_decay < math.inf):
            raise TrainingError("the learning rate must be positive and the weight decay not negative")
        if not (0 <= self.stain_jitter <= 1 and 0 <= self.scale_jitter <= 3):
            raise TrainingError(
                f"the stain jitter must be in [0, 1] and the scale jitter in [0, 3], not "
                f"{self.stain_jitter} and {self.scale_jitter}"
            )
        if self.loss not in LOSSES:
            raise TrainingError(f"unknown loss {self.loss!r}: choose {' or '.join(LOSSES)}")
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
    """BCE + soft Dice or Lovasz hinge for one class; cross-entropy + soft Dice or Lovasz softmax for several."""

    def __init__(self, channels: int, second: str = "dice") -> None:
        super().__init__()
        from segmentation_models_pytorch import losses

        self.binary = channels == 1
        mode = "binary" if self.binary else "multiclass"
        self.first = losses.SoftBCEWithLogitsLoss() if self.binary else nn.CrossEntropyLoss()
        self.second = losses.DiceLoss(mode) if second == "dice" else losses.LovaszLoss(mode)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.binary:
            target = (target > 0).float().unsqueeze(1)
        return self.first(logits, target) + self.second(logits, target)


def loss_name(channels: int, second: str) -> str:
    first = "BCE" if channels == 1 else "cross-entropy"
    return f"{first} + {'soft Dice' if second == 'dice' else 'Lovasz'}"


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
    state_dir = training_state_dir(out)
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
    loss_fn = _Loss(model_config.out_channels, recipe.loss)
    sampler_generator = torch.Generator().manual_seed(recipe.seed)
    history: list[Epoch] = []
    best = (0, -1.0)
    first_epoch = 1
    if resume:
        first_epoch, history, best = _load_state(
            state_dir, network, optimizer, scheduler, sampler_generator, recipe, _tile_counts(train_set, val_set)
        )
    else:
        if state_dir.exists():
            shutil.rmtree(state_dir)  # an unfinished run the user asked to overwrite, or one that finished no epoch
        state_dir.mkdir()
        saved = {**asdict(recipe), "tiles": _tile_counts(train_set, val_set)}
        (state_dir / "recipe.json").write_text(json.dumps(saved, indent=2))
    with _kept_only_when_resumable(state_dir):
        mean = torch.tensor(model_config.normalization["mean"], device=target).view(1, 3, 1, 1)
        std = torch.tensor(model_config.normalization["std"], device=target).view(1, 3, 1, 1)
        augment = Augment(recipe.stain_jitter, _zoom(recipe.scale_jitter)) if recipe.augment else None
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
                value = loss.item()  # the one wait for the device in a step
                if not math.isfinite(value):  # checked before the step, which would spread it to every weight
                    raise _diverged(
                        state_dir, recipe, f"epoch {epoch}, step {step + 1}", f"the training loss is {value}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += value * len(index)
                seen += len(index)
                if on_step is not None:
                    on_step(Step(epoch, step + 1, steps_per_epoch, value))
            if stopped:
                break
            val_loss, val_dice = _validate(network, val_set, loss_fn, recipe.batch_size, target, mean, std)
            if not math.isfinite(val_loss):
                raise _diverged(state_dir, recipe, f"epoch {epoch}", f"the validation loss is {val_loss}")
            bad = count_nonfinite(network.state_dict())
            if bad:
                raise _diverged(
                    state_dir, recipe, f"epoch {epoch}", f"{bad} weight tensors hold NaN or infinite values"
                )
            bad = _nonfinite_moments(optimizer)
            if bad:
                raise _diverged(state_dir, recipe, f"epoch {epoch}", f"{bad} optimizer moments are not finite")
            report = Epoch(
                epoch,
                total_loss / max(seen, 1),
                val_loss,
                val_dice,
                scheduler.get_last_lr()[0],
                time.perf_counter() - started,
            )
            best = record_epoch(
                state_dir, network, optimizer, scheduler, sampler_generator, history, best, report, val_dice, on_epoch
            )
        if stopped or len(history) < recipe.epochs:
            return TrainResult(None, best[0], best[1], history)
        return _finish(out, state_dir, model_config, recipe, history, best, tiles, provenance or {}, overwrite, half)


def record_epoch(state_dir, network, optimizer, scheduler, generator, history, best, report, score, on_epoch):
    """Keep a finished epoch: its row, its weights as the best when `score` beats the best, the resumable state.

    Returns the new (best epoch, best score). Shared by the glomerulus and the nuclei loops.
    """
    history.append(report)
    if score > best[1]:
        best = (report.epoch, score)
        _save_weights(network, state_dir / "best.safetensors")
    _save_state(state_dir, network, optimizer, scheduler, generator, report.epoch, history, best)
    if on_epoch is not None:
        on_epoch(report)
    return best


def _zoom(jitter: float) -> tuple[float, float]:
    """The affine zoom range of a scale jitter: symmetric in log scale, the paper's 0.9 to 1.1 at least."""
    return (min(0.9, 1 / (1 + jitter)), max(1.1, 1 + jitter))


@contextmanager
def _kept_only_when_resumable(state_dir: Path) -> Iterator[None]:
    """On any error or interruption, remove a state folder that holds no finished epoch: nothing to resume."""
    try:
        yield
    except BaseException:
        if state_dir.is_dir() and not (state_dir / STATE).exists():
            shutil.rmtree(state_dir, ignore_errors=True)
        raise


def _diverged(state_dir: Path, recipe: Recipe, where: str, what: str) -> TrainingError:
    """The one line for a run whose loss or weights stopped being numbers; nothing of it is saved."""
    kept = ""
    if (state_dir / STATE).exists():  # the epochs before were checked finite when they were saved
        kept = f" with --overwrite (the finished epochs before it are kept in {state_dir.name})"
    return TrainingError(
        f"training diverged at {where}: {what}; lower --lr (it was {recipe.lr:g}) and train again{kept}"
    )


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
    bad = count_nonfinite(state)
    if bad:  # the loop stops before this; never let non-finite weights become resumable or "best"
        raise TrainingError(f"{bad} weight tensors hold NaN or infinite values: lower --lr and train again")
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


def _tile_counts(train_set: TileSet, val_set: TileSet) -> dict:
    """What a resumed run must find unchanged besides its recipe: other tiles mean another schedule and sampler."""
    return {"train": len(train_set), "validation": len(val_set)}


def _load_state(state_dir, network, optimizer, scheduler, generator, recipe, tiles: dict, kind: type = Epoch):
    """The run as it was after its last finished epoch; a damaged or foreign state folder is one line."""
    saved = _read_recipe(state_dir / "recipe.json")
    was = saved.pop("tiles", tiles)  # runs of earlier versions did not record their tiles
    if was != tiles:
        raise TrainingError(
            f"{state_dir}: was started on {was} tiles, not {tiles}: resume with the same annotations, images and "
            "tile settings, or pass --overwrite to start again"
        )
    if saved != asdict(recipe):
        changed = sorted(k for k in set(saved) | set(asdict(recipe)) if saved.get(k) != asdict(recipe).get(k))
        raise TrainingError(
            f"{state_dir}: was started with a different {', '.join(changed)}; resume with the same settings"
        )
    path = state_dir / STATE
    state = _read_state(path, recipe)
    fresh_scheduler = scheduler.state_dict()
    fresh_groups = optimizer.state_dict()["param_groups"]
    try:
        network.load_state_dict(_read_weights(state_dir / "last.safetensors"))
    except RuntimeError as exc:  # other tensor names or shapes
        raise TrainingError(
            f"{state_dir}: was started with another network ({_damaged_reason(exc)}); resume with the same "
            "--arch, --encoder, classes and --input, or start again with --overwrite"
        ) from None
    try:
        for group, fresh in zip(state["optimizer"]["param_groups"], fresh_groups, strict=True):
            _check_like({k: v for k, v in group.items() if k != "params"}, fresh, "optimizer")
        optimizer.load_state_dict(state["optimizer"])
        _check_optimizer(optimizer)
        _check_like(state["scheduler"], fresh_scheduler, "scheduler")
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        generator.set_state(state["sampler_rng"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise _damaged(path, exc) from None
    history = _read_metrics(state_dir / METRICS, kind)
    if len(history) != state["epoch"] or [e.epoch for e in history] != list(range(1, state["epoch"] + 1)):
        raise _damaged(state_dir / METRICS, f"{len(history)} epochs listed, {state['epoch']} finished")
    best = (int(state["best"][0]), float(state["best"][1]))
    if best[0]:
        _read_weights(state_dir / "best.safetensors")  # present, readable, finite: the checkpoint is made of it
    return state["epoch"] + 1, history, best


def _damaged_reason(exc: BaseException) -> str:
    """The kind of error and its first sentence: torch's own messages run to paragraphs."""
    if isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in str(exc).lower():
        return "it holds objects other than tensors and numbers, and was not unpickled"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = text.splitlines()[0].split(". ")[0][:160] if text else ""
    return f"{exc.__class__.__name__}: {first}" if first else exc.__class__.__name__


def _damaged(path: Path, reason: object) -> TrainingError:
    if isinstance(reason, BaseException):
        reason = _damaged_reason(reason)
    return TrainingError(
        f"{path}: damaged, or not written by napari-nephro ({reason}); start the run again with --overwrite"
    )


def _read_recipe(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise _damaged(path, "missing") from None
    except (ValueError, UnicodeDecodeError, RecursionError, OSError) as exc:
        raise _damaged(path, exc) from None
    if not isinstance(saved, dict):
        raise _damaged(path, "not a JSON object")
    return saved


def _read_state(path: Path, recipe: Recipe) -> dict:
    """`state.pt` through torch's weights-only unpickler (tensors, numbers, lists, dicts: never code)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle of anything else, truncated or garbage bytes: torch raises many kinds
        raise _damaged(path, exc) from None
    expected = {
        "epoch": int,
        "optimizer": dict,
        "scheduler": dict,
        "torch_rng": torch.Tensor,
        "sampler_rng": torch.Tensor,
        "best": (list, tuple),
    }
    if not isinstance(state, dict):
        raise _damaged(path, f"holds a {type(state).__name__}, not a training state")
    for key, kind in expected.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise _damaged(path, f"no valid {key!r}")
    if not 1 <= state["epoch"] <= recipe.epochs:
        raise _damaged(path, f"epoch {state['epoch']} of a {recipe.epochs}-epoch run")
    best = state["best"]
    if (
        len(best) != 2
        or not isinstance(best[0], int)
        or not isinstance(best[1], (int, float))
        or not 0 <= best[0] <= state["epoch"]
    ):
        raise _damaged(path, "no valid best epoch")
    for key in ("torch_rng", "sampler_rng"):
        if state[key].dtype != torch.uint8:
            raise _damaged(path, f"{key} is not a random generator's state")
    return state


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state folder's weights: a readable safetensors file with finite values only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise _damaged(path, "missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _damaged(path, exc) from None
    bad = count_nonfinite(state)
    if bad:
        raise _damaged(path, f"{bad} of {len(state)} tensors hold NaN or infinite values")
    return state


def _check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Loaded moments must fit their parameters and be finite, or the first step fails or spreads NaN."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if name == "step":
                    if not isinstance(value, (torch.Tensor, int, float)) or isinstance(value, bool):
                        raise ValueError("optimizer step is not a number")
                elif not isinstance(value, torch.Tensor) or value.shape != param.shape:
                    raise ValueError(f"optimizer {name} does not fit a parameter of shape {tuple(param.shape)}")
    if _nonfinite_moments(optimizer):
        raise ValueError("optimizer moments hold NaN or infinite values")


def _nonfinite_moments(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        1
        for moments in optimizer.state.values()
        for value in moments.values()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    )


def _check_like(found: dict, expected: dict, what: str) -> None:
    """The keys and kinds of values of a fresh object's state: `load_state_dict` of a scheduler takes any
    dict (a key "step" would replace the method), and a wrong type fails only later, deep inside torch."""
    unknown = sorted(str(k) for k in set(found) - set(expected))
    if unknown:
        raise ValueError(f"{what} keys {', '.join(unknown)[:80]}")
    for key, other in found.items():
        if not _same_kind(other, expected[key]):
            raise ValueError(f"{what} {key} is a {type(other).__name__}")


def _same_kind(found: object, expected: object) -> bool:
    if isinstance(expected, (list, tuple)):
        return (
            type(found) is type(expected)
            and len(found) == len(expected)
            and all(_same_kind(f, e) for f, e in zip(found, expected, strict=True))
        )
    if type(found) is type(expected):
        return True
    if type(expected) is float:
        return type(found) is int
    return {type(found), type(expected)} <= {type(None), bool}  # e.g. foreach: None or a choice


def _write_metrics(path: Path, history: list) -> None:
    """One row per epoch; the columns are the epoch record's fields (`Epoch`, or the nuclei loop's)."""
    text = io.StringIO()
    names = [f.name for f in fields(type(history[0]))] if history else list(FIELDS)
    writer = csv.DictWriter(text, fieldnames=names)
    writer.writeheader()
    for e in history:
        writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(e).items()})
    with atomic_output(path) as tmp:
        tmp.write_text(text.getvalue())


def _read_metrics(path: Path, kind: type = Epoch) -> list:
    names = [f.name for f in fields(kind)]
    try:
        with open(path, newline="") as f:
            return [kind(int(r["epoch"]), *(float(r[k]) for k in names[1:])) for r in csv.DictReader(f)]
    except FileNotFoundError:
        raise _damaged(path, "missing") from None
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, csv.Error, OSError) as exc:
        raise _damaged(path, exc) from None


def _finish(out, state_dir, model_config, recipe, history, best, tiles, provenance, overwrite, half) -> TrainResult:
    from ..models.networks import build_network

    network = build_network(model_config)
    network.load_state_dict(_read_weights(state_dir / "best.safetensors"))
    config = ModelConfig(**{**asdict(model_config), "provenance": {}})
    config.provenance = {
        **model_config.provenance,
        **provenance,
        "recipe": asdict(recipe),
        "loss": loss_name(model_config.out_channels, recipe.loss),
        "optimizer": "AdamW, linear warm-up then cosine decay",
        "tiles": {"train+val": len(tiles), "sources": sorted(set(tiles.groups)), "class_pixels": tiles.class_pixels()},
        "best_epoch": best[0],
        "val_dice": round(best[1], 4),
        "history": [asdict(e) for e in history],
    }
    try:
        save_checkpoint(network, config, out, overwrite=overwrite, half=half)
    except ModelError as exc:  # e.g. weights that overflow float16: every epoch is still in the state folder
        raise TrainingError(f"{exc}; finish with --resume{' without --half' if half else ''}") from None
    shutil.copy(state_dir / METRICS, out / METRICS)
    shutil.rmtree(state_dir)
    return TrainResult(out, best[0], best[1], history)
