"""StarDist nuclei as an `InstanceSegmenter`, with TensorFlow kept in a process of its own.

Which model (`stardist[:FOLDER]` on the command line, `load(FOLDER)` here):

- no FOLDER (or `2D_versatile_he`): StarDist's H&E model, from the folder
  `StarDist2D.from_pretrained` unzips it into: `~/.keras/models/StarDist2D/
  2D_versatile_he/` (or `$KERAS_HOME/...`; Keras 3.6+ unzips into a
  `2D_versatile_he_extracted` folder there, with a `2D_versatile_he` link to it).
  Nothing is downloaded: if the files are not there, a one-line error names the
  zip StarDist itself downloads and where to unzip it.
- a StarDist 2D model folder for RGB images: `config.json`, `weights_best.h5`
  (else `weights_last.h5`) and, optionally, `thresholds.json`.

Thresholds: `prob_thresh` and `nms_thresh` as given, else the folder's
`thresholds.json`, else StarDist's defaults (0.5, 0.4).

Scale: 2D_versatile_he was trained on MoNuSeg 2018 and TNBC (both scanned at
40x, about 0.25 um/px); StarDist does not say at which scale the network saw
them. QuPath's StarDist guide runs the H&E model of StarDist's authors at
0.5 um/px and finds the pretrained models work best at about 0.5 um/px. So tiles
are read at 0.5 um/px (`mpp` to change it, e.g. for a model trained at 40x): a
7 um nucleus is 14 px, a 1024 px tile is 512 um, and the 96 px halo (48 um) is
larger than any nucleus. Each tile is normalised as StarDist's H&E example does
(1 and 99.8 percentiles over all pixels and channels together), except that a
range under 64 grey levels is not stretched further (a tile of bare glass is not
blown up into texture). One class, "nucleus"; each object's score is StarDist's
probability for it.

TensorFlow: importing torchvision (CUDA wheels, which load triton) after
TensorFlow kills the process with a segmentation fault, on this project's
machines too. So the model runs in a child process (`_stardist_worker.py`) that
loads it once and answers tiles over a pipe; this process never imports
TensorFlow, the child never imports torch. The child is stopped by `close()`,
when the segmenter is garbage collected, or at exit; if it dies, the next call
is a one-line ModelError, never a hang.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections import deque
from pathlib import Path

import numpy as np

from ._stardist_worker import receive, send
from .errors import ModelError
from .instances import TileInstances

PRETRAINED = "2D_versatile_he"
PRETRAINED_URL = "https://github.com/stardist/stardist-models/releases/download/v0.1/python_2D_versatile_he.zip"
OTHER_PRETRAINED = ("2D_versatile_fluo", "2D_paper_dsb2018", "2D_demo")  # single-channel (fluorescence) models
INSTALL = 'pip install "napari-nephro[stardist]"'
DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 96
DEFAULT_MPP = 0.5
STARDIST_THRESHOLDS = {"prob": 0.5, "nms": 0.4}  # what StarDist uses without a thresholds.json
PERCENTILES = (1.0, 99.8)
MIN_RANGE = 64.0  # grey levels: the smallest percentile range a tile is stretched to [0, 1] from
WEIGHT_FILES = ("weights_best.h5", "weights_last.h5")
OPTIONS = ("prob_thresh", "nms_thresh", "mpp", "tile_size", "overlap")
WORKER = Path(__file__).with_name("_stardist_worker.py")
FAILED = "StarDist failed in its TensorFlow process: "
# 2 CPU cores, real-size 2D_versatile_he network (1.4 M parameters) with random weights: 1.33 s per 1024 px tile;
# NMS and drawing on the true shapes of 2,300 MoNuSeg nuclei at 0.5 um/px 0.3-0.4 s; about 1.7 s per megapixel
CPU_SECONDS_PER_MEGAPIXEL = 2.0


# --------------------------------------------------------------------------------------------- finding files


def keras_cache() -> Path:
    """Where Keras keeps downloads: $KERAS_HOME, else ~/.keras (read at each call)."""
    env = os.environ.get("KERAS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".keras"


def pretrained_dir() -> Path:
    return keras_cache() / "models" / "StarDist2D" / PRETRAINED


def _missing_pretrained() -> ModelError:
    return ModelError(
        f"StarDist model {PRETRAINED} not found: download {PRETRAINED_URL} and unzip it into {pretrained_dir()} "
        f"(config.json, thresholds.json and weights_best.h5 directly in that folder), or give a model folder: "
        f"stardist:FOLDER"
    )


def find_folder(path: str | os.PathLike[str] | None) -> Path:
    """The model folder for a path or None (2D_versatile_he in StarDist's cache); never downloads."""
    if path is None or str(path) == PRETRAINED:
        base = pretrained_dir()
        tmp = Path("/tmp/.keras/models/StarDist2D") / PRETRAINED  # where Keras goes when home is read-only
        for folder in (base / PRETRAINED, base / f"{PRETRAINED}_extracted", base, tmp / f"{PRETRAINED}_extracted", tmp):
            if (folder / "config.json").is_file():
                return folder
        raise _missing_pretrained()
    given = Path(path).expanduser()
    if given.is_dir():
        return given
    if given.is_file():
        raise ModelError(f"{given}: a file; give the StarDist model folder holding it ({given.parent})")
    if str(path) in OTHER_PRETRAINED:
        raise ModelError(f"{path}: a StarDist model for one-channel fluorescence images; H&E needs {PRETRAINED}")
    raise ModelError(f"{given}: no such folder; give a StarDist model folder (config.json, weights_best.h5)")


def weights_in(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    hint = (
        f"download {PRETRAINED_URL} and unzip it there"
        if folder.name.startswith(PRETRAINED)
        else "put the weights StarDist saved with its config.json there"
    )
    raise ModelError(f"{folder}: no {' or '.join(WEIGHT_FILES)} in this StarDist model folder; {hint}")


def _json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable {what} ({type(exc).__name__}); use the file StarDist wrote") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: not a StarDist {what} (a JSON object is expected)")
    return data


def read_config(folder: Path) -> dict:
    """config.json, checked to be a 2D StarDist model for RGB images."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder}: no config.json, so not a StarDist model folder (config.json, weights_best.h5)")
    config = _json(path, "StarDist config")
    if "n_rays" not in config:
        raise ModelError(f"{path}: not a StarDist config (no n_rays)")
    if config.get("n_dim", 2) != 2:
        raise ModelError(f"{path}: a {config.get('n_dim')}D StarDist model; slides need a 2D one")
    if config.get("n_channel_in") != 3:
        raise ModelError(
            f"{path}: a StarDist model for {config.get('n_channel_in')}-channel images; H&E tiles are RGB: "
            f"use {PRETRAINED} or a model trained on RGB"
        )
    return config


def read_thresholds(folder: Path) -> dict[str, float]:
    """thresholds.json's prob and nms, else StarDist's defaults."""
    path = folder / "thresholds.json"
    if not path.is_file():
        return dict(STARDIST_THRESHOLDS)
    data = _json(path, "thresholds file")
    try:
        return {key: _fraction(f"{path.name} {key}", data[key]) for key in ("prob", "nms")}
    except KeyError as exc:
        raise ModelError(f"{path}: no {exc.args[0]!r} threshold; StarDist writes prob and nms") from None


# --------------------------------------------------------------------------------------------- options


def _fraction(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ModelError(f"StarDist {name} must be a number between 0 and 1, not {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise ModelError(f"StarDist {name} must be between 0 and 1, not {value!r}")
    return number


def _whole(name: str, value, low: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ModelError(f"StarDist {name} must be a whole number, not {value!r}") from None
    if number != value or number < low:
        raise ModelError(f"StarDist {name} must be a whole number of at least {low}, not {value!r}")
    return number


def _positive(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise ModelError(f"StarDist {name} must be a positive number, not {value!r}")
    return number


def _target(device: str) -> str:
    """'auto', 'cpu' or 'cuda' for TensorFlow (which picks its own GPU); MPS is not a TensorFlow device."""
    name = str(device).split(":")[0]
    if name not in ("auto", "cpu", "cuda", "mps"):
        raise ModelError(f"unknown device {device!r}: choose one of auto, cpu, cuda")
    if name == "mps":
        raise ModelError("StarDist runs on TensorFlow, which has no MPS device here: use --device cpu (or auto)")
    return name


def _require_packages() -> None:
    """stardist and TensorFlow must be installed; checked without importing TensorFlow here."""
    missing = []
    for package in ("stardist", "tensorflow"):
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    if missing:
        raise _not_installed(" and ".join(missing))


def _not_installed(what: str) -> ModelError:
    return ModelError(f"StarDist needs {what}, which is not installed: {INSTALL}")


# --------------------------------------------------------------------------------------------- the worker


class StarDistWorker:
    """The child process that runs TensorFlow: one request at a time, answers read back whole, death detected."""

    def __init__(self, folder: Path, weights: Path, device: str) -> None:
        self.process, self._stderr = spawn(WORKER)
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop, self.process)
        try:
            self.info = self.call("load", {"folder": str(folder), "weights": weights.name, "device": device})
        except ModelError as exc:
            self.close()
            if not str(exc).startswith(FAILED):
                raise
            raise ModelError(f"{weights}: StarDist could not load this model ({str(exc)[len(FAILED) :]})") from None
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def call(self, op: str, payload):
        """Send one request, wait for its answer; a dead worker or a broken answer is a one-line ModelError."""
        with self._lock:
            if not self.alive:
                raise self._died()
            try:
                send(self.process.stdin, (op, payload))
                answer = receive(self.process.stdout)
            except (EOFError, OSError, ValueError):
                raise self._died() from None
            except BaseException:  # interrupted mid-answer: the stream is out of step, so the worker is done
                self.close()
                raise
        if answer[0] == "ok":
            return answer[1]
        _, kind, message = answer
        if kind == "missing":
            self.close()
            raise _not_installed(message.split(":")[0])
        raise ModelError(f"{FAILED}{message}")

    def _died(self) -> ModelError:
        if self.closed:
            return ModelError("this StarDist model was closed (its TensorFlow process stopped): load it again")
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # its output broke off but it lives on: stop it
            self.close()
            code = self.process.returncode
        killed = code is not None and code < 0 and -code == getattr(signal, "SIGKILL", None)
        if killed:
            how = "killed by SIGKILL: out of memory, or stopped by hand"
        elif code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        else:
            how = f"exit code {code}"
        last = next((line.strip() for line in reversed(self._stderr) if line.strip()), "")
        said = f"; its last words: {last[:200]}" if last and code and not killed else ""  # else: TensorFlow's chatter
        return ModelError(f"StarDist's TensorFlow process stopped ({how}){said}; load the model again to restart it")

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop the process: asked to end when idle, killed when a request is in flight (that call then fails)."""
        if self._lock.acquire(blocking=False):
            try:
                self._finalizer()
            finally:
                self._lock.release()
        else:
            with contextlib.suppress(OSError):
                self.process.kill()
            self._finalizer()


def spawn(script: Path) -> tuple[subprocess.Popen, deque[str]]:
    """Start a TensorFlow worker script (this one, or the review fine-tune's) with pipes for messages; the last
    lines it writes to stderr are kept, so it never blocks on a full pipe and its death can be explained."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    process = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    tail: deque[str] = deque(maxlen=50)
    threading.Thread(target=_drain, args=(process.stderr, tail), daemon=True).start()
    return process, tail


def _drain(stream, tail: deque) -> None:
    """Keep the last lines the worker wrote to stderr (TensorFlow's noise, or why it died), so it never blocks."""
    for raw in iter(stream.readline, b""):
        tail.append(raw.decode("utf-8", "replace").rstrip())
    stream.close()


def _stop(process: subprocess.Popen) -> None:
    """End the worker: ask (end of input), then kill if it has not gone within 5 s."""
    if process.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            send(process.stdin, ("close", None))
            process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout):
        with contextlib.suppress(OSError, ValueError):
            stream.close()


# --------------------------------------------------------------------------------------------- the segmenter


class StarDistSegmenter:
    """A StarDist 2D model for RGB tiles; see the module docstring for scale, thresholds and the worker."""

    kind = "instance"
    gpu_model = False
    cpu_seconds_per_megapixel = CPU_SECONDS_PER_MEGAPIXEL

    def __init__(
        self,
        worker: StarDistWorker,
        *,
        name: str,
        prob_thresh: float,
        nms_thresh: float,
        mpp: float = DEFAULT_MPP,
        tile_size: int = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
        fingerprint: str = "",
    ) -> None:
        self.worker = worker
        self.classes = ["nucleus"]
        self.name = name
        self.prob_thresh, self.nms_thresh = prob_thresh, nms_thresh
        self.mpp, self.tile_size, self.overlap = mpp, tile_size, overlap
        self.fingerprint = fingerprint
        self.device = "cuda" if worker.info.get("gpu") else "cpu"

    def predict_instances(self, tiles: np.ndarray) -> list[TileInstances]:
        """(N, T, T, 3) uint8 RGB -> one TileInstances per tile (labels 1..n, class 0, StarDist's probability)."""
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise ValueError(f"tiles must be (N, H, W, 3) uint8 RGB, not {tiles.shape} {tiles.dtype}")
        request = {
            "tiles": np.ascontiguousarray(tiles),
            "prob": self.prob_thresh,
            "nms": self.nms_thresh,
            "percentiles": PERCENTILES,
            "min_range": MIN_RANGE,
        }
        out = []
        for labels, prob in self.worker.call("predict", request):
            scores = np.clip(np.concatenate([[0.0], prob]), 0.0, 1.0)  # label i + 1 is polygon i
            out.append(TileInstances.from_labels(labels, scores=scores))
        return out

    def close(self) -> None:
        """Stop the TensorFlow process (also done when the segmenter is garbage collected, and at exit)."""
        self.worker.close()

    def __enter__(self) -> StarDistSegmenter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fingerprint(weights: Path, config: Path, facts: tuple) -> str:
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(config.read_bytes())
    digest.update(repr(facts).encode())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- load


def load(path: str | os.PathLike[str] | None = None, *, device: str = "auto", **options) -> StarDistSegmenter:
    """A StarDist segmenter from a model folder (None: 2D_versatile_he in StarDist's cache); starts its worker.

    options: prob_thresh, nms_thresh (default: the folder's thresholds.json), mpp
    (um/px the tiles are read at, default 0.5), tile_size (px, default 1024),
    overlap (px, default 96).
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ModelError(f"unknown StarDist option(s) {', '.join(unknown)}: valid ones are {', '.join(OPTIONS)}")
    options = {k: v for k, v in options.items() if v is not None}
    target = _target(device)
    folder = find_folder(path)
    read_config(folder)
    weights = weights_in(folder)
    thresholds = read_thresholds(folder)
    prob = _fraction("prob_thresh", options.get("prob_thresh", thresholds["prob"]))
    nms = _fraction("nms_thresh", options.get("nms_thresh", thresholds["nms"]))
    mpp = _positive("mpp", options.get("mpp", DEFAULT_MPP))
    tile = _whole("tile_size", options.get("tile_size", DEFAULT_TILE), 64)
    overlap = _whole("overlap", options.get("overlap", DEFAULT_OVERLAP), 0)
    if overlap >= tile:
        raise ModelError(f"StarDist overlap must be smaller than tile_size={tile}, not {overlap}")
    _require_packages()
    facts = (prob, nms, mpp, tile, overlap, PERCENTILES, MIN_RANGE)
    fingerprint = _fingerprint(weights, folder / "config.json", facts)
    worker = StarDistWorker(folder, weights, target)
    return StarDistSegmenter(
        worker,
        name=folder.name,
        prob_thresh=prob,
        nms_thresh=nms,
        mpp=mpp,
        tile_size=tile,
        overlap=overlap,
        fingerprint=fingerprint,
    )
