"""Fine-tune a model on a review project's easy and hard pairs: the last step of Guo et al.'s loop.

The input is the training set `nephro review export --to tiles` writes
(`review.export`): images/ and masks/ PNGs, tiles.csv with each pair's `set`
(easy / hard) and `weight`, dataset.json with the scale and where it came from.
Each family is trained the way it is trained elsewhere, never by a copy of a loop:

- ours (`nuclei`, `nuclei:FOLDER`, a HoVer checkpoint folder) and CellViT
  (`cellvit:FILE.pth`): `training.nuclei_loop.train_nuclei`, started as
  `nephro train --task nuclei --from` starts them (`pipelines.train_nuclei.starting_network`);
  the patches read at the model's scale, whole patches held out for validation;
- glomerulus checkpoints (`default`, U-Net, U-Net 3+, Swin U-Net folders):
  `training.loop.train` on tiles cut from the class masks at the model's tile
  size and scale (`training.data.cut_tiles`, as `nephro train` cuts them);
- Cellpose (`cellpose[:FILE]`): cellpose's own `train.train_seg` (`finetune_cellpose`);
- StarDist (`stardist[:FOLDER]`): StarDist's own `train`, in a TensorFlow process
  of its own (`finetune_stardist`).

Oversampling: a pair's crops are drawn with probability proportional to its
weight times its area, so a pixel of a hard patch is w_hard / w_easy times as
likely to be trained on as one of an easy patch. The weights are CellViT's
class-wise ones (Hörst et al., Medical Image Analysis 94 (2024) 103143; see
`review.oversampling`): w = N / (gamma N_c + (1 - gamma) N) over the sets, with
gamma 0.85 in Guo et al. When every pair of the set is used, tiles.csv's weights
are taken as written; when only some sets are, they are recomputed over the
chosen pairs with the gamma dataset.json records (one set alone: all 1).

Provenance: our checkpoint folders record it in config.json (`provenance.review`);
CellViT and Cellpose files and StarDist folders get `<out>.review.json` beside
them. Either says which training set, which sets and how many pairs, the weights
and the recipe. Nothing is left at `out` by a run that fails or is stopped.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import __version__
from ..common.atomic import atomic_output
from ..common.json_io import read_json
from .layout import ReviewError
from .oversampling import GAMMA, oversampling_weights

SETS = ("easy", "hard")
REQUIRED = ("image", "mask", "patch", "set", "weight")  # the tiles.csv columns fine-tuning reads
MASK_VALUES = {"instance": "nuclei", "class": "glomeruli"}
FAMILIES = ("nuclei", "cellvit", "glomeruli", "cellpose", "stardist")
SIDECAR = ".review.json"
VAL_FRACTION = 0.15  # of the patches, held out whole where the family's loop validates


@dataclass(frozen=True)
class Settings:
    """What the caller chose; None takes the family's default (`DEFAULTS`)."""

    epochs: int | None = None
    steps_per_epoch: int | None = None
    batch_size: int | None = None
    crop: int | None = None
    lr: float | None = None
    freeze_encoder: bool = False
    seed: int = 0

    def filled(self, defaults: Settings) -> Settings:
        return replace(
            self, **{f.name: getattr(defaults, f.name) for f in fields(self) if getattr(self, f.name) is None}
        )


# per family: fine-tuning starts from trained weights, so lower rates than training from scratch (nuclei 2e-3)
DEFAULTS = {
    "nuclei": Settings(epochs=10, steps_per_epoch=25, batch_size=8, crop=192, lr=5e-4),
    "cellvit": Settings(epochs=10, steps_per_epoch=25, batch_size=8, crop=256, lr=1e-4),
    "glomeruli": Settings(epochs=10, steps_per_epoch=0, batch_size=8, crop=0, lr=1e-4),  # steps, crop: not used
}


@dataclass
class FinetuneEpoch:
    """One epoch of a Cellpose or StarDist fine-tune (ours report the loops' own `NucleiEpoch` / `Epoch`)."""

    epoch: int
    train_loss: float
    val_loss: float | None
    seconds: float


class Stopped(Exception):
    """Raised inside a family's run when `stop()` says so; `finetune` returns None, nothing written."""


# --- the training set ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    patch: str
    kind: str  # "easy" or "hard"
    image: Path
    mask: Path
    weight: float


@dataclass
class TrainingSet:
    """The chosen pairs of an exported set, with the weights to draw them by."""

    root: Path
    mpp: float
    mask_values: str  # "instance" (nuclei) or "class" (glomeruli)
    classes: dict[int, str]
    review: dict  # dataset.json's "review" block
    gamma: float
    sets: tuple[str, ...]
    pairs: list[Pair] = field(default_factory=list)
    weights_from: str = "tiles.csv"

    @property
    def task(self) -> str:
        return MASK_VALUES[self.mask_values]

    def counts(self) -> dict[str, int]:
        return {s: sum(p.kind == s for p in self.pairs) for s in self.sets}


def read_training_set(root: str | os.PathLike[str], sets: tuple[str, ...] | list[str] = SETS) -> TrainingSet:
    """The pairs of `sets` in an exported training set, every file checked (present, readable, same size)."""
    root = Path(root)
    sets = _check_sets(sets)
    if not root.is_dir():
        raise ReviewError(f"{root}: no such folder; give the folder nephro review export wrote")
    index = root / "tiles.csv"
    if not index.is_file():
        raise ReviewError(f"{root}: not an exported training set (no tiles.csv); write one with nephro review export")
    meta = _read_meta(root / "dataset.json")
    rows = _read_index(index)
    review = meta.get("review") if isinstance(meta.get("review"), dict) else {}
    gamma = review.get("gamma", GAMMA)
    classes = {int(k): str(v) for k, v in (meta.get("classes") or {}).items() if str(k).isdigit()}
    everything = [_pair(root, index, line, row) for line, row in enumerate(rows, start=2)]
    if not everything:
        raise ReviewError(f"{index}: no pairs listed; export the project again")
    chosen = [p for p in everything if p.kind in sets]
    if not chosen:
        have = ", ".join(f"{s} {sum(p.kind == s for p in everything)}" for s in SETS)
        raise ReviewError(f"{root}: no {' or '.join(sets)} pairs in this training set ({have})")
    out = TrainingSet(root, meta["mpp"], meta["mask_values"], classes, review, gamma, sets, chosen)
    if len(chosen) < len(everything):  # the export's weights balance sets that are not all used: recompute
        weights = oversampling_weights([p.kind for p in chosen], gamma)
        out.pairs = [replace(p, weight=float(w)) for p, w in zip(chosen, weights, strict=True)]
        out.weights_from = f"recomputed over the chosen sets (gamma {gamma})"
    for pair in out.pairs:
        _check_sizes(pair)
    return out


def _check_sets(sets) -> tuple[str, ...]:
    sets = tuple(dict.fromkeys([sets] if isinstance(sets, str) else sets))
    wrong = [s for s in sets if s not in SETS]
    if not sets or wrong:
        raise ReviewError(f"sets must be among {', '.join(SETS)}, not {', '.join(map(str, wrong)) or 'none'}")
    return sets


def _read_meta(path: Path) -> dict:
    if not path.exists():
        raise ReviewError(f"{path.parent}: no dataset.json beside tiles.csv; export the project again")
    meta = read_json(path, error=ReviewError)
    if not isinstance(meta, dict):
        raise ReviewError(f"{path}: not a dataset description (a JSON object is expected)")
    mpp = meta.get("mpp")
    if not isinstance(mpp, int | float) or isinstance(mpp, bool) or not (0 < mpp < math.inf):
        raise ReviewError(f"{path}: no pixel size (mpp) recorded; export the project again")
    if meta.get("mask_values") not in MASK_VALUES:
        raise ReviewError(f"{path}: mask_values must be instance or class, not {meta.get('mask_values')!r}")
    return meta


def _read_index(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or ())]
            if missing:
                raise ReviewError(f"{path}: missing columns {', '.join(missing)}; export the project again")
            return list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ReviewError(f"{path}: not a readable CSV ({exc})") from None


def _pair(root: Path, index: Path, line: int, row: dict[str, str]) -> Pair:
    where = f"{index}: line {line}"
    kind = row.get("set") or ""
    if kind not in SETS:
        raise ReviewError(f"{where}: set must be easy or hard, not {kind!r}")
    try:
        weight = float(row.get("weight") or "nan")
    except ValueError:
        weight = math.nan
    if not (0 < weight < math.inf):
        raise ReviewError(f"{where}: the weight must be a positive number, not {row.get('weight')!r}")
    files = []
    for column in ("image", "mask"):
        path = root / (row.get(column) or "")
        if not row.get(column) or not path.is_file():
            raise ReviewError(f"{where}: {column} {row.get(column)!r} is missing from {root}")
        files.append(path)
    return Pair(row.get("patch") or files[0].stem, kind, files[0], files[1], weight)


def _check_sizes(pair: Pair) -> None:
    try:
        with Image.open(pair.image) as image, Image.open(pair.mask) as mask:
            size, mask_size, bands = image.size, mask.size, len(mask.getbands())
    except (UnidentifiedImageError, OSError) as exc:
        raise ReviewError(f"{pair.patch}: not a readable image ({exc})") from None
    if mask_size != size:
        raise ReviewError(
            f"{pair.patch}: its mask is {mask_size[0]}x{mask_size[1]} px but its image {size[0]}x{size[1]}; "
            "export the project again"
        )
    if bands != 1:
        raise ReviewError(f"{pair.mask}: not a label image ({bands} channels); export the project again")


def read_mask(pair: Pair) -> np.ndarray:
    with Image.open(pair.mask) as opened:
        return np.asarray(opened).astype(np.int32)


def nucleus_images(tset: TrainingSet, mpp: float) -> list:
    """Each pair as a `NucleusImage` at `mpp` (the model's scale), its own group: validation holds out patches."""
    from ..annotations.io import LabelFile
    from ..pipelines.export import Item
    from ..training.nuclei_data import nucleus_image

    out = []
    for pair in tset.pairs:
        labels = read_mask(pair)
        item = Item(pair.patch, raster=LabelFile(labels), shape=labels.shape, image=pair.image)
        out.append(nucleus_image(item, mpp, tset.mpp, pair.patch))
    return out


def draw_weights(tset: TrainingSet, images: list) -> np.ndarray:
    """Each pair's share of the draws: its weight times its area at the model's scale."""
    return np.array([p.weight * float(im.labels.size) for p, im in zip(tset.pairs, images, strict=True)])


# --- provenance -------------------------------------------------------------------------------------------------


def review_block(tset: TrainingSet, recipe: dict) -> dict:
    """What a fine-tuned model records about its data: the set, the sets used and their weights, the recipe."""
    weights = {s: sorted({round(p.weight, 6) for p in tset.pairs if p.kind == s}) for s in tset.sets}
    return {
        "dataset": str(tset.root),
        "project": tset.review.get("project"),
        "export": tset.review,
        "sets": tset.counts(),
        "weights": {s: w[0] if len(w) == 1 else w for s, w in weights.items() if w},
        "weights_from": tset.weights_from,
        "gamma": tset.gamma,
        "sampling": "each pair drawn in proportion to its weight times its area",
        "recipe": recipe,
    }


def sidecar(out: Path) -> Path:
    return out.with_name(out.name + SIDECAR)


def write_sidecar(out: Path, spec: str, family: str, block: dict, *, also: tuple[Path, ...] = ()) -> None:
    """`<out>.review.json`; when it cannot be written, the model at `out` (and `also`) is taken back:
    a model without its provenance is a partial result."""
    data = {"fine_tuned_from": spec, "family": family, "trained_with": f"napari-nephro {__version__}", "review": block}
    try:
        with atomic_output(sidecar(out)) as tmp:
            tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    except BaseException:
        if out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        else:
            out.unlink(missing_ok=True)
        for path in also:
            path.unlink(missing_ok=True)
        raise


# --- the entry point ----------------------------------------------------------------------------------------------


def family_of(spec: str) -> str:
    """nuclei / cellvit / cellpose / stardist, or glomeruli for a checkpoint folder of ours (or `default`)."""
    from ..models.checkpoint import CONFIG, resolve_checkpoint
    from ..models.errors import ModelError
    from ..models.nuclei import family_of as nuclei_family

    family = nuclei_family(str(spec))
    if family is not None:
        return family
    try:
        folder = resolve_checkpoint(spec)
    except ModelError as exc:
        raise ReviewError(str(exc)) from None
    if not (folder / CONFIG).is_file():
        raise ReviewError(
            f"{spec}: not a model to fine-tune; give a checkpoint folder, default, nuclei[:FOLDER], "
            "cellvit:FILE.pth, cellpose[:FILE] or stardist[:FOLDER]"
        )
    return "glomeruli"


def spec_path(spec: str, family: str) -> str | None:
    """The path part of `family:PATH` (None when bare), or the spec itself when it is a folder."""
    name, _, rest = str(spec).partition(":")
    return (rest or None) if name.strip().lower() == family else str(spec)


def finetune(
    dataset_dir: str | os.PathLike[str],
    model_spec: str,
    out: str | os.PathLike[str],
    *,
    sets: tuple[str, ...] | list[str] = SETS,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    batch_size: int | None = None,
    crop: int | None = None,
    lr: float | None = None,
    freeze_encoder: bool = False,
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[object], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Path | None:
    """Fine-tune `model_spec` on the `sets` of the exported training set `dataset_dir`; the new model at `out`.

    `out` is a checkpoint folder (ours, glomeruli, StarDist) or a file (CellViT:
    .pth; Cellpose). Options left None take the family's defaults; a glomerulus
    epoch is one pass over its tiles (`steps_per_epoch` and `crop` do not apply),
    Cellpose-SAM trains on 256 px crops only. `progress(done, total)` counts
    training steps; `on_epoch` gets each finished epoch's record; when `stop()`
    turns true the run ends at the next step, nothing is written and None is
    returned. Mistakes are one-line ReviewError (or TrainingError) before training.
    """
    out = Path(out)
    settings = _settings(epochs, steps_per_epoch, batch_size, crop, lr, freeze_encoder, seed)
    family = family_of(model_spec)
    _require_package(family)
    tset = read_training_set(dataset_dir, sets)
    task = "glomeruli" if family == "glomeruli" else "nuclei"
    if tset.task != task:
        kind = "glomerulus (class masks)" if tset.task == "glomeruli" else "nuclei (instance masks)"
        raise ReviewError(f"{dataset_dir}: a {kind} training set cannot fine-tune {model_spec} (a {task} model)")
    _check_out(out, family, overwrite)
    common = {"device": device, "progress": progress, "on_epoch": on_epoch, "stop": stop}
    try:
        if family in ("nuclei", "cellvit"):
            return _hover(tset, model_spec, family, out, settings, overwrite=overwrite, **common)
        if family == "glomeruli":
            return _glomeruli(tset, model_spec, out, settings, overwrite=overwrite, **common)
        if family == "cellpose":
            from .finetune_cellpose import finetune_cellpose

            return finetune_cellpose(tset, model_spec, out, settings, **common)
        from .finetune_stardist import finetune_stardist

        return finetune_stardist(tset, model_spec, out, settings, **common)
    except Stopped:
        return None


def _settings(epochs, steps, batch, crop, lr, freeze, seed) -> Settings:
    for name, value in (("epochs", epochs), ("steps per epoch", steps), ("batch size", batch), ("crop", crop)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ReviewError(f"the {name} must be a whole number of at least 1, not {value!r}")
    if lr is not None and not (isinstance(lr, int | float) and 0 < lr < math.inf):
        raise ReviewError(f"the learning rate must be a positive number, not {lr!r}")
    return Settings(epochs, steps, batch, crop, lr, bool(freeze), int(seed))


def _require_package(family: str) -> None:
    import importlib.util

    needs = {"cellpose": ("cellpose",), "stardist": ("stardist", "tensorflow")}.get(family, ())
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        extra = 'pip install "napari-nephro[stardist]"' if family == "stardist" else 'pip install "cellpose>=4"'
        raise ReviewError(f"fine-tuning {family} needs {' and '.join(missing)}, which is not installed: {extra}")


def _check_out(out: Path, family: str, overwrite: bool) -> None:
    from ..training.errors import state_dir

    if family == "cellvit" and out.suffix.lower() not in (".pth", ".pt"):
        raise ReviewError(f"{out}: a fine-tuned CellViT is a checkpoint file: name it .pth")
    if not out.parent.is_dir():
        raise ReviewError(f"{out}: folder {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise ReviewError(f"{out}: already exists; pass --overwrite to replace it")
    if family == "cellpose" and out.is_dir():
        raise ReviewError(f"{out}: a folder; a fine-tuned Cellpose model is a file")
    if state_dir(out).exists() and not overwrite:
        raise ReviewError(f"{state_dir(out)}: an unfinished training run is there; remove it or pass --overwrite")


@contextlib.contextmanager
def _no_state_left(out: Path) -> Iterator[None]:
    """The loops keep a resumable state folder when stopped or failing after an epoch: fine-tuning does not resume."""
    from ..training.errors import state_dir

    try:
        yield
    finally:
        shutil.rmtree(state_dir(out), ignore_errors=True)


def _steps(progress, epochs: int):
    """The loops' Step (epoch, step, steps per epoch) as progress(done, total)."""
    if progress is None:
        return None
    return lambda s: progress((s.epoch - 1) * s.steps + s.step, epochs * s.steps)


def _hover(tset, spec, family, out, settings, *, device, overwrite, progress, on_epoch, stop) -> Path | None:
    """Ours and CellViT: the nuclei loop, started as `nephro train --task nuclei --from SPEC` starts it."""
    from ..models.errors import ModelError
    from ..pipelines.train_nuclei import starting_network
    from ..training.nuclei_loop import NucleiRecipe, train_nuclei

    init = spec if family == "cellvit" else (spec_path(spec, "nuclei") or "nuclei")
    try:
        config, network, save = starting_network(init, None, None, None)
    except ModelError as exc:
        raise ReviewError(str(exc)) from None
    s = settings.filled(DEFAULTS[family])
    recipe = NucleiRecipe(
        epochs=s.epochs,
        steps_per_epoch=s.steps_per_epoch,
        batch_size=s.batch_size,
        crop=s.crop,
        lr=s.lr,
        seed=s.seed,
        val_fraction=VAL_FRACTION,
        freeze_encoder=s.freeze_encoder,
    )
    recipe.check()
    images = nucleus_images(tset, config.mpp)
    block = review_block(tset, asdict(recipe))
    provenance = {
        "trained_with": f"napari-nephro {__version__}",
        "fine_tuned_from": str(spec),
        "data": {"review_training_set": str(tset.root)},
        "review": block,
    }
    with _no_state_left(out):
        result = train_nuclei(
            images,
            config,
            out,
            recipe=recipe,
            network=network,
            save=save,
            device=device,
            overwrite=overwrite,
            provenance=provenance,
            image_weights=[p.weight for p in tset.pairs],
            on_step=_steps(progress, recipe.epochs),
            on_epoch=on_epoch,
            stop=stop,
        )
    if result.path is None:
        return None
    if family == "cellvit":
        write_sidecar(out, str(spec), family, block, also=(out.with_suffix(".metrics.csv"),))
    return out


def class_items(tset: TrainingSet) -> list:
    """Each pair as an `Item` whose raster is its class mask (value v = class v), for `cut_tiles`."""
    from ..annotations.io import LabelFile
    from ..pipelines.export import Item

    names = tset.classes or {1: "glomerulus"}
    items = []
    for pair in tset.pairs:
        mask = read_mask(pair)
        raster = LabelFile(mask, {v: names.get(v, f"class {v}") for v in np.unique(mask).tolist() if v})
        items.append(Item(pair.patch, raster=raster, shape=mask.shape, mpp=tset.mpp, image=pair.image))
    return items


def _glomeruli(tset, spec, out, settings, *, device, overwrite, progress, on_epoch, stop) -> Path | None:
    """Glomerulus checkpoints: tiles cut from the class masks at the model's scale, the glomerulus loop."""
    from ..models.errors import ModelError
    from ..pipelines.train import model_config_for
    from ..training.data import cut_tiles
    from ..training.loop import Recipe, train

    try:
        config, network = model_config_for(
            arch=None,
            encoder=None,
            decoder_channels=None,
            classes=None,
            mpp=None,
            tile=None,
            overlap=None,
            input_size=None,
            init=Path(str(spec)),
        )
    except ModelError as exc:
        raise ReviewError(str(exc)) from None
    found = sorted(set(tset.classes.values()) - set(config.classes))
    if len(config.classes) > 1 and found:
        raise ReviewError(
            f"{tset.root}: classes {', '.join(found)} are not among the model's ({', '.join(config.classes)})"
        )
    s = settings.filled(DEFAULTS["glomeruli"])
    recipe = Recipe(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed, freeze_encoder=s.freeze_encoder)
    recipe.check()
    items = class_items(tset)
    tiles = cut_tiles(
        items,
        classes=config.classes,
        mpp=config.mpp,
        tile=config.tile_size,
        overlap=config.overlap,
        input_size=config.input_size,
        image_mpp=tset.mpp,
        allow_empty=True,
    )
    tiles.weights = tile_weights(tset, tiles.groups)
    block = review_block(tset, asdict(recipe))
    provenance = {
        "made_by": f"nephro review finetune (napari-nephro {__version__})",
        "data": {"review_training_set": str(tset.root)},
        "started_from": str(spec),
        "review": block,
    }
    with _no_state_left(out):
        result = train(
            tiles,
            config,
            out,
            recipe=recipe,
            network=network,
            device=device,
            overwrite=overwrite,
            provenance=provenance,
            on_step=_steps(progress, recipe.epochs),
            on_epoch=on_epoch,
            stop=stop,
        )
    return result.path


def tile_weights(tset: TrainingSet, groups: list[str]) -> np.ndarray:
    """Each tile's pair weight (tiles are all one size, so a patch's area counts through its number of tiles)."""
    by_patch = {p.patch: p.weight for p in tset.pairs}
    if len(by_patch) == 1:  # one source is split into bands, all of one pair
        return np.ones(len(groups))
    return np.array([by_patch[g] for g in groups], dtype=np.float64)
