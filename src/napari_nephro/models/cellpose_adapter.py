"""Cellpose nuclei as `InstanceSegmenter`s: the classic U-Net (our own `cellpose_classic`) and Cellpose-SAM (the
installed cellpose 4), both turned into masks by the installed cellpose's own flow dynamics.

Which model (`cellpose[:PATH]` on the command line, `load(PATH)` here): PATH is
a model name or a model file.

- no PATH: `nuclei`, the classic nuclei net. It is the most useful offline on a
  CPU: 6.6 M parameters, about 10 s per 544 px tile on 2 cores, the model most
  published kidney work used. Cellpose-SAM is better on many images but, per
  area of slide, about 35 times slower on a CPU (12 x per pixel, at 3 x the
  pixels): a GPU model.
- names: the classic `nuclei`, `cyto3`, `cyto2`, `cyto` (and Cellpose 3's
  `*_cp3` nets), and Cellpose-SAM's `cpsam`, `cpsam_v2`. A name is looked up in
  cellpose's own model folder, `$CELLPOSE_LOCAL_MODELS_PATH`, else
  `~/.cellpose/models`, under the file name cellpose gives it (`nuclei` is
  `nucleitorch_0`). Nothing is downloaded: a missing file is a one-line error
  naming the URL cellpose itself downloads it from.
- a file: a classic net (its state dict has `downsample.down.res_down_0...`) or
  Cellpose-SAM (it has `W2` and a SAM encoder), told apart by its keys; read with
  `torch.load(weights_only=True)`, so nothing in it can run.

Scale: each model is trained on objects of a set diameter in pixels (17 px for
`nuclei`, 30 for the other classic nets, as stored in a user model's
`diam_mean`; Cellpose-SAM rescales images so cells are 30 px). The option
`diameter` is the typical nucleus diameter in micrometres (default 7.5 um: the
median of NuInsSeg's kidney nuclei is 7.8 um, MoNuSeg's 6.1 um) and the tiles are
read at mpp = diameter / model diameter (0.44 um/px for `nuclei`, 0.25 for
Cellpose-SAM, i.e. 40x), so no model ever resizes a tile and the number of flow
steps is Cellpose's 200. `flow_threshold` (0.4) and `cellprob_threshold` (0.0)
are Cellpose's own; masks under 15 px are dropped and holes filled, as Cellpose
does. Every nucleus is of the one class "nucleus"; its score is the mean
probability (sigmoid of the cell probability) over its pixels.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch

from .cellpose_classic import (
    BLOCK,
    CellposeNet,
    classic_input,
    is_classic,
    network_from_state,
    predict_flows,
    read_state_dict,
    weights_digest,
)
from .device import pick_device
from .errors import ModelError
from .instances import TileInstances

# tile sides chosen so Cellpose's own block tiling (blocks of 224 / 256 px overlapping by 10 % of the padded tile)
# needs 3 x 3 blocks with the least waste: 544 px (+16 padding = 560 = 2.5 blocks of 224 x 1.2), 624 px for 256
DEFAULT_TILE = 544
SAM_TILE = 624
SAM_BLOCK = 256
DEFAULT_DIAMETER_UM = 7.5
SAM_DIAMETER_PX = 30.0  # Cellpose-SAM's eval rescales images by 30 / diameter: 30 px objects are its own scale
OVERLAP_DIAMETERS = 3.5  # the halo: a nucleus up to 3.5 typical diameters lies whole in the tile that owns it
MIN_SIZE = 15  # px: Cellpose's default; smaller masks are dropped
NITER = 200  # Cellpose's flow steps at the model's own scale
CLASSIC_URL = "https://www.cellpose.org/models/"  # where Cellpose 3 downloads the classic nets (models.py)
SAM_URL = "https://huggingface.co/mouseland/cellpose-sam/resolve/main/"  # where cellpose 4 downloads them
CLASSIC_FILES = {  # Cellpose 3's model names -> the file names in its model folder (models.model_path)
    "nuclei": "nucleitorch_0",
    "cyto3": "cyto3",
    "cyto2": "cyto2torch_0",
    "cyto": "cytotorch_0",
    **{n: n for n in ("cyto2_cp3", "tissuenet_cp3", "livecell_cp3", "yeast_PhC_cp3", "yeast_BF_cp3")},
    **{n: n for n in ("bact_phase_cp3", "bact_fluor_cp3", "deepbacs_cp3")},
}
SAM_FILES = {"cpsam": "cpsam", "cpsam_v2": "cpsam_v2"}
NUCLEI_DIAMETER_PX = 17.0  # Cellpose 3 gives `nuclei` 17 px, every other built-in net 30 px
CLASSIC_DIAMETER_PX = 30.0
# seconds per megapixel of tile on 2 CPU cores, fp32, real-size nets with random weights (measurements in
# tests/test_cellpose.py's module docstring): classic, a 544 px tile = 3 x 3 blocks of 224 px, 6.5 s, + dynamics on
# half the pixels, 2.5 s; Cellpose-SAM, a 624 px tile = 3 x 3 blocks of 256 px at 12-16 s each, + dynamics
CLASSIC_CPU_SECONDS_PER_MEGAPIXEL = 30.0
SAM_CPU_SECONDS_PER_MEGAPIXEL = 350.0
OPTIONS = ("model", "diameter", "flow_threshold", "cellprob_threshold", "invert", "tile_size", "overlap", "batch_size")
MODELS_ENV = "CELLPOSE_LOCAL_MODELS_PATH"


# --------------------------------------------------------------------------------------------- finding files


def models_folder() -> Path:
    """Cellpose's own model folder: $CELLPOSE_LOCAL_MODELS_PATH, else ~/.cellpose/models (read at each call)."""
    env = os.environ.get(MODELS_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cellpose" / "models"


def url_of(name: str) -> str:
    return (SAM_URL if name in SAM_FILES else CLASSIC_URL) + {**CLASSIC_FILES, **SAM_FILES}[name]


def _missing(name: str) -> ModelError:
    file = {**CLASSIC_FILES, **SAM_FILES}[name]
    return ModelError(
        f"Cellpose model {name!r} not found: download {url_of(name)} and put it in {models_folder()} as {file} "
        f"(or set {MODELS_ENV} to the folder holding it, or give the file's path: cellpose:FILE)"
    )


def find_model(path: str | os.PathLike[str] | None) -> tuple[str | None, Path]:
    """(model name or None, file) for a name, a file, or None (`nuclei`); never downloads."""
    if path is None:
        path = "nuclei"
    text = str(path)
    given = Path(text).expanduser()
    if given.is_file():
        known = {file: name for name, file in {**CLASSIC_FILES, **SAM_FILES}.items()}
        return known.get(given.name), given
    if given.is_dir():
        raise ModelError(f"{given}: a folder; give the Cellpose model file in it (e.g. {given / 'nucleitorch_0'})")
    if text in CLASSIC_FILES or text in SAM_FILES:
        file = models_folder() / {**CLASSIC_FILES, **SAM_FILES}[text]
        if not file.is_file():
            raise _missing(text)
        return text, file
    names = [*CLASSIC_FILES, *SAM_FILES]
    close = difflib.get_close_matches(text, names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close and len(given.parts) == 1 else ""
    raise ModelError(
        f"{text}: no such file, and not a Cellpose model name; {hint}use nuclei, cyto3, cyto2, cyto, cpsam, "
        f"cpsam_v2 or the path of a model file"
    )


# ------------------------------------------------------------------------------------------------ masks


def masks_from_flows(
    flows: np.ndarray,
    cellprob: np.ndarray,
    *,
    flow_threshold: float = 0.4,
    cellprob_threshold: float = 0.0,
    niter: int = NITER,
    min_size: int = MIN_SIZE,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """(2, H, W) network flows (dY, dX, as the net gives them: 5 x unit vectors) and (H, W) cell probability logits
    -> (H, W) int32 labels, by the installed cellpose's dynamics: pixels above `cellprob_threshold` follow the flows
    for `niter` steps, pixels meeting at a point form a mask, masks whose own flows differ from the net's by more
    than `flow_threshold` are dropped, holes filled, masks under `min_size` px dropped."""
    from cellpose import dynamics

    device = torch.device(device)
    if device.type not in ("cpu", "cuda", "mps"):
        device = torch.device("cpu")
    masks = dynamics.resize_and_compute_masks(
        np.ascontiguousarray(flows, np.float32),
        np.ascontiguousarray(cellprob, np.float32),
        niter=int(niter),
        cellprob_threshold=float(cellprob_threshold),
        flow_threshold=float(flow_threshold),
        min_size=int(min_size),
        max_size_fraction=0.4,
        device=device,
    )
    return np.asarray(masks).astype(np.int32)


def instances_from(labels: np.ndarray, cellprob: np.ndarray) -> TileInstances:
    """Labels and the probability logits -> TileInstances; each object's score is its mean sigmoid probability."""
    labels = np.asarray(labels).astype(np.int64)
    prob = 1.0 / (1.0 + np.exp(-np.clip(np.asarray(cellprob, np.float64), -50, 50)))
    size = int(labels.max()) + 1 if labels.size else 1
    count = np.bincount(labels.ravel(), minlength=size)
    total = np.bincount(labels.ravel(), prob.ravel(), minlength=size)
    scores = np.divide(total, count, out=np.zeros(size), where=count > 0).astype(np.float32)
    return TileInstances.from_labels(labels.astype(np.int32), scores=np.clip(scores, 0.0, 1.0))


# --------------------------------------------------------------------------------------------- options


def _number(name: str, value, *, low: float | None = None, positive: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ModelError(f"Cellpose {name} must be a number, not {value!r}") from None
    if not math.isfinite(number) or (positive and number <= 0) or (low is not None and number < low):
        need = "positive" if positive else f"at least {low}" if low is not None else "finite"
        raise ModelError(f"Cellpose {name} must be {need}, not {value!r}")
    return number


def _whole(name: str, value, low: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ModelError(f"Cellpose {name} must be a whole number, not {value!r}") from None
    if number != value or number < low:
        raise ModelError(f"Cellpose {name} must be a whole number of at least {low}, not {value!r}")
    return number


def _round16(value: float) -> int:
    return int(16 * math.ceil(value / 16))


class _Tiles:
    """What both adapters share: scale from the diameter, tile and halo, thresholds, the fingerprint."""

    kind = "instance"

    def _setup(self, model_px: float, tile: int, options: dict, weights: str) -> None:
        self.classes = ["nucleus"]
        self.diameter = _number("diameter", options.get("diameter", DEFAULT_DIAMETER_UM), positive=True)
        self.flow_threshold = _number("flow_threshold", options.get("flow_threshold", 0.4), low=0.0)
        self.cellprob_threshold = _number("cellprob_threshold", options.get("cellprob_threshold", 0.0))
        self.model_diameter_px = float(model_px)
        self.mpp = self.diameter / self.model_diameter_px
        self.tile_size = _whole("tile_size", options.get("tile_size", tile), 64)
        halo = options.get("overlap", _round16(OVERLAP_DIAMETERS * self.model_diameter_px))
        self.overlap = _whole("overlap", halo, 0)
        if self.overlap >= self.tile_size:
            raise ModelError(f"Cellpose overlap must be smaller than tile_size={self.tile_size}, not {self.overlap}")
        gpu = self.device.type != "cpu"
        self.batch_size = _whole("batch_size", options.get("batch_size", 32 if gpu else 8), 1)
        facts = (self.mpp, self.tile_size, self.overlap, self.flow_threshold, self.cellprob_threshold, MIN_SIZE)
        self.fingerprint = hashlib.sha256(f"{weights}:{facts}:{self._extra()}".encode()).hexdigest()[:16]

    def _extra(self) -> str:
        return ""


def _check_tiles(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be (N, H, W, 3) uint8 RGB, not {tiles.shape} {tiles.dtype}")
    return tiles


# --------------------------------------------------------------------------------------------- classic


class CellposeClassicSegmenter(_Tiles):
    """The classic Cellpose U-Net on RGB tiles: gray, normalised, inverted (H&E), flows by blocks, masks by dynamics.

    `invert` (default on) makes H&E's dark nuclei bright, as Cellpose's advice for
    histology has it (its nets saw mostly fluorescence); turn it off for a model
    trained on uninverted brightfield.
    """

    gpu_model = False
    cpu_seconds_per_megapixel = CLASSIC_CPU_SECONDS_PER_MEGAPIXEL

    def __init__(
        self, network: CellposeNet, *, name: str | None = None, device: torch.device | str = "cpu", **options
    ) -> None:
        unknown = sorted(set(options) - set(OPTIONS) - {"model"})
        if unknown:
            raise ModelError(f"unknown Cellpose option(s) {', '.join(unknown)}: valid ones are {', '.join(OPTIONS)}")
        self.device = torch.device(device)
        self.network = network.eval().to(self.device)
        self.name = name or "classic Cellpose net"
        self.invert = bool(options.get("invert", True))
        if name == "nuclei":
            diameter_px = NUCLEI_DIAMETER_PX
        elif name in CLASSIC_FILES:
            diameter_px = CLASSIC_DIAMETER_PX  # Cellpose 3 trusts its own value for built-in nets, not the file's
        else:
            diameter_px = float(network.diam_mean.item())
        self._setup(diameter_px, DEFAULT_TILE, options, weights_digest(network.state_dict()))

    def _extra(self) -> str:
        return f"classic:{self.invert}:{BLOCK}"

    def predict_flows(self, tile: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (3, H, W): dY, dX and the cell probability logit."""
        image = classic_input(tile, nchan=self.network.nbase[0], invert=self.invert)
        return predict_flows(self.network, image, device=self.device, batch_size=self.batch_size)

    def predict_instances(self, tiles: np.ndarray) -> list[TileInstances]:
        """(N, T, T, 3) uint8 RGB -> one TileInstances per tile."""
        out = []
        for tile in _check_tiles(tiles):
            flows = self.predict_flows(tile)
            labels = masks_from_flows(
                flows[:2],
                flows[2],
                flow_threshold=self.flow_threshold,
                cellprob_threshold=self.cellprob_threshold,
                device=self.device,
            )
            out.append(instances_from(labels, flows[2]))
        return out


# ------------------------------------------------------------------------------------------ Cellpose-SAM


def _expected_sam_state() -> dict[str, torch.Tensor]:
    """The keys and shapes of cellpose 4's CPSAM net, built on the meta device (no memory, no weights)."""
    from cellpose.vit import CPSAM

    with torch.device("meta"):
        return CPSAM().state_dict()


def check_sam_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse, in one line, a file whose weights are not exactly Cellpose-SAM's (cellpose would load it loosely)."""
    if "encoder.cls_token" in state:
        raise ModelError(
            f"{path}: a Cellpose-DINO model (cpdino), which needs facebookresearch/dinov3: use cpsam or cpsam_v2"
        )
    expected = _expected_sam_state()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        first = (
            f"{len(missing)} weights missing (e.g. {missing[0]})"
            if missing
            else f"{len(extra)} unexpected (e.g. {extra[0]})"
            if extra
            else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, not {tuple(expected[wrong[0]].shape)}"
        )
        raise ModelError(f"{path}: its weights do not fit Cellpose-SAM: {first}; download {url_of('cpsam')}")


def _sampled_digest(state: dict[str, torch.Tensor]) -> str:
    """Identifies large weights without hashing a gigabyte: every key and shape, and the ends of each tensor."""
    digest = hashlib.sha256()
    for key in sorted(state):
        flat = state[key].reshape(-1)
        digest.update(f"{key}:{tuple(state[key].shape)}:{state[key].dtype}".encode())
        digest.update(torch.cat([flat[:64], flat[-64:]]).float().numpy().tobytes())
    return digest.hexdigest()[:16]


class CellposeSAMSegmenter(_Tiles):
    """Cellpose-SAM through the installed cellpose's `CellposeModel.eval`, one tile at a time.

    RGB goes in as it is (each channel normalised 1-99 %, no inversion: the model
    was trained on colour images); no diameter is given to eval, since the tiles
    are read at the scale where nuclei are its 30 px. About 300 M parameters: a
    GPU model (minutes per tile on a CPU).
    """

    gpu_model = True
    cpu_seconds_per_megapixel = SAM_CPU_SECONDS_PER_MEGAPIXEL

    def __init__(self, model, *, name: str = "cpsam", fingerprint: str = "", **options) -> None:
        unknown = sorted(set(options) - set(OPTIONS) - {"model"})
        if unknown:
            raise ModelError(f"unknown Cellpose option(s) {', '.join(unknown)}: valid ones are {', '.join(OPTIONS)}")
        if "invert" in options:
            raise ModelError("invert is an option of the classic Cellpose nets; Cellpose-SAM takes the colour tile")
        self.model = model
        self.device = torch.device(model.device)
        self.name = name
        self._setup(SAM_DIAMETER_PX, SAM_TILE, options, fingerprint or name)

    def _extra(self) -> str:
        return f"sam:{self.name}"

    def predict_instances(self, tiles: np.ndarray) -> list[TileInstances]:
        """(N, T, T, 3) uint8 RGB -> one TileInstances per tile."""
        out = []
        for tile in _check_tiles(tiles):
            masks, flows, _ = self.model.eval(
                tile,
                channel_axis=2,
                normalize={"normalize": True},  # a dict: eval copies it (a bool would be written into its defaults)
                diameter=None,
                flow_threshold=self.flow_threshold,
                cellprob_threshold=self.cellprob_threshold,
                min_size=MIN_SIZE,
                niter=NITER,
                batch_size=self.batch_size,
            )
            out.append(instances_from(np.asarray(masks).reshape(tile.shape[:2]), np.asarray(flows[2])))
        return out


def _cellpose_sam(path: Path, name: str | None, device: torch.device, state: dict, options: dict):
    """The installed cellpose's CellposeModel on an existing, checked file (so it cannot try to download)."""
    check_sam_state(state, path)
    digest = _sampled_digest(state)
    del state
    from cellpose import models as cp_models

    model = cp_models.CellposeModel(pretrained_model=str(path), device=device, use_bfloat16=device.type == "cuda")
    return CellposeSAMSegmenter(model, name=name or path.name, fingerprint=digest, **options)


# ------------------------------------------------------------------------------------------------- load


def load(
    path: str | os.PathLike[str] | None = None, *, device: str = "auto", **options
) -> CellposeClassicSegmenter | CellposeSAMSegmenter:
    """A Cellpose segmenter from a model name or file (None: the classic `nuclei`; see the module docstring).

    options: model (a name, instead of `path`), diameter (um, default 7.5),
    flow_threshold (0.4; 0 keeps every mask), cellprob_threshold (0.0), invert
    (classic nets only; default on, for H&E), tile_size (px; 544 classic, 624
    Cellpose-SAM), overlap (px; 3.5 model diameters), batch_size (blocks per
    network call; 8 on a CPU, 32 on a GPU).
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ModelError(f"unknown Cellpose option(s) {', '.join(unknown)}: valid ones are {', '.join(OPTIONS)}")
    options = {k: v for k, v in options.items() if v is not None}
    model = options.pop("model", None)
    if model is not None and path is not None and str(model) != str(path):
        raise ModelError(f"two Cellpose models given ({path!r} and model={model!r}): give one")
    name, file = find_model(path if path is not None else model)
    target = pick_device(device)
    hint = f"use a file cellpose made, e.g. {url_of('nuclei')} or {url_of('cpsam')}"
    state = read_state_dict(file, hint)
    if is_classic(state):
        diameter_px = NUCLEI_DIAMETER_PX if name == "nuclei" else CLASSIC_DIAMETER_PX
        network = network_from_state(state, file, diam_mean=diameter_px)
        return CellposeClassicSegmenter(network, name=name, device=target, **options)
    if "W2" in state:
        return _cellpose_sam(file, name, target, state, options)
    raise ModelError(f"{file}: neither a classic Cellpose net nor Cellpose-SAM (its keys are neither); {hint}")
