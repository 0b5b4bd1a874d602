"""A review project on disk: plain files a person can open, the one format every review step shares.

    PROJECT/
      project.json                 what the project is (see `Project`): task, patch size and scale, seed,
                                   slides, models with their weights' fingerprint and scale
      patches.csv                  one row per patch (see `Patch`): where on which slide it was cut
      patches/<patch>.png          the patch, RGB, `size` x `size` px at the project's `mpp`
      predictions.csv              one row per finished prediction: patch, model, objects, seconds
      predictions/<model>/<patch>.tif
                                   the model's objects on the patch: uint32 instance ids (0 background),
                                   same pixels as the patch PNG
      predictions/<model>/<patch>.classes.json
                                   glomeruli with classes only: {"<id>": "<class name>", ...}
      ratings/<rater>.csv          one rater's ratings, appended one line at a time (see `append_rating`);
                                   the last line for a (patch, model) wins; a rater sees only their file;
                                   ratings/adjudicated.csv (rater `ADJUDICATOR`) settles disagreements
      corrections/<patch>.tif      a fused-bad patch corrected by hand: uint32 instance ids (the hard set)
      corrections.csv              one row per saved correction: patch, rater, started_from, objects, time
      results/                     fusion tables (CSV) and figures (PNG), rewritten by `nephro review fuse`

Ratings are `good` (about 90 % or more of the objects found), `medium`, or `bad`
(under half found), Guo et al.'s scale. Every write is whole-or-nothing (files
via a temporary name; rating lines flushed and fsynced), so a crash loses at
most the rating being typed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..common.atomic import atomic_output

VERSION = 1
RATINGS = ("good", "medium", "bad")
TASKS = ("nuclei", "glomeruli")
PROJECT_FILE = "project.json"
PATCHES_CSV = "patches.csv"
PREDICTIONS_CSV = "predictions.csv"
CORRECTIONS_CSV = "corrections.csv"
PATCH_FIELDS = ("patch", "slide", "x", "y", "width", "height")
PREDICTION_FIELDS = ("patch", "model", "objects", "seconds")
RATING_FIELDS = ("patch", "model", "rating", "time")
CORRECTION_FIELDS = ("patch", "rater", "started_from", "objects", "time")
ADJUDICATOR = "adjudicated"  # the rater name whose ratings settle what other raters disagree on
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # model and rater names: safe as file names


class ReviewError(ValueError):
    """A user mistake with a review project: printed as one line."""


@dataclass
class ModelEntry:
    """One model of the project: `name` (short, a folder name), `spec` (as `--model` takes it) and what made it."""

    name: str
    spec: str
    family: str = ""  # nuclei: cellpose / stardist / cellvit / nuclei; glomeruli: the architecture
    fingerprint: str = ""  # of the weights and settings: a prediction from other weights is not mixed in
    mpp: float | None = None  # the model's working scale
    licence: str = ""


@dataclass
class SlideEntry:
    id: str  # short id used in patches.csv
    path: str
    mpp: float | None = None


@dataclass
class Project:
    """project.json."""

    task: str  # "nuclei" or "glomeruli"
    size: int  # patch side in px at `mpp`
    mpp: float  # patch pixel size
    seed: int
    sampling: str  # "random" or "stratified" (the same number of patches per slide)
    slides: list[SlideEntry] = field(default_factory=list)
    models: list[ModelEntry] = field(default_factory=list)
    created: str = ""
    version: int = VERSION

    def model(self, name: str) -> ModelEntry:
        for entry in self.models:
            if entry.name == name:
                return entry
        raise ReviewError(f"no model {name!r} in this project: it has {', '.join(m.name for m in self.models)}")

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]


@dataclass(frozen=True)
class Patch:
    """A row of patches.csv: x, y, width, height in the slide's level-0 pixels."""

    patch: str
    slide: str
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Rating:
    patch: str
    model: str
    rating: str
    time: str = ""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ReviewError(
            f"{kind} name {name!r}: use letters, digits, '.', '_' or '-' (up to 64, not starting with a symbol)"
        )
    return name


def patch_id(index: int) -> str:
    """p0001, p0002, ...: sorts as it was sampled."""
    return f"p{index + 1:04d}"


# --- paths -------------------------------------------------------------------------------------------------


def patch_png(root: Path, patch: str) -> Path:
    return Path(root) / "patches" / f"{patch}.png"


def prediction_tif(root: Path, model: str, patch: str) -> Path:
    return Path(root) / "predictions" / model / f"{patch}.tif"


def prediction_classes(root: Path, model: str, patch: str) -> Path:
    return Path(root) / "predictions" / model / f"{patch}.classes.json"


def read_classes(path: Path) -> dict[int, str]:
    """A classes file beside a glomerulus prediction or correction ({"<id>": "<class name>"}); {} when absent."""
    if not path.is_file():
        return {}
    try:
        return {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError) as exc:
        raise ReviewError(f"{path}: not a classes file ({exc})") from None


def ratings_csv(root: Path, rater: str) -> Path:
    return Path(root) / "ratings" / f"{check_name('rater', rater)}.csv"


def correction_tif(root: Path, patch: str) -> Path:
    return Path(root) / "corrections" / f"{patch}.tif"


def results_dir(root: Path) -> Path:
    return Path(root) / "results"


# --- project.json and patches.csv ----------------------------------------------------------------------------


def is_project(root: str | os.PathLike[str]) -> bool:
    return (Path(root) / PROJECT_FILE).is_file()


def read_project(root: str | os.PathLike[str]) -> Project:
    path = Path(root) / PROJECT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReviewError(
            f"{root}: not a review project (no {PROJECT_FILE}); make one with nephro review new"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReviewError(f"{path}: not valid JSON ({exc})") from None
    try:
        slides = [SlideEntry(**s) for s in data.pop("slides", [])]
        models = [ModelEntry(**m) for m in data.pop("models", [])]
        project = Project(**data, slides=slides, models=models)
    except TypeError as exc:
        raise ReviewError(f"{path}: not a review project file ({exc})") from None
    if project.version > VERSION:
        raise ReviewError(f"{path}: written by a newer napari-nephro (version {project.version}); update it")
    if project.task not in TASKS:
        raise ReviewError(f"{path}: task must be one of {', '.join(TASKS)}, not {project.task!r}")
    return project


def write_project(root: str | os.PathLike[str], project: Project) -> None:
    with atomic_output(Path(root) / PROJECT_FILE) as tmp:
        tmp.write_text(json.dumps(asdict(project), indent=2) + "\n")


def read_patches(root: str | os.PathLike[str]) -> list[Patch]:
    rows = _read_csv(Path(root) / PATCHES_CSV, PATCH_FIELDS)
    return [
        Patch(r["patch"], r["slide"], float(r["x"]), float(r["y"]), float(r["width"]), float(r["height"])) for r in rows
    ]


def write_patches(root: str | os.PathLike[str], patches: list[Patch]) -> None:
    _write_csv(Path(root) / PATCHES_CSV, PATCH_FIELDS, [asdict(p) for p in patches])


# --- label images --------------------------------------------------------------------------------------------


def write_labels(path: Path, labels: np.ndarray) -> None:
    """A uint32 instance image as a plain (zlib) TIFF, whole or not at all."""
    import tifffile

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"a (H, W) label image expected, not {labels.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tifffile.imwrite(tmp, labels.astype(np.uint32), compression="zlib")


def read_labels(path: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path).astype(np.uint32)


# --- ratings: append-only lines, last one wins ----------------------------------------------------------------


def append_rating(root: str | os.PathLike[str], rater: str, patch: str, model: str, rating: str) -> Rating:
    """Record one rating at once (flushed and fsynced): a crash after this returns loses nothing."""
    if rating not in RATINGS:
        raise ReviewError(f"a rating is one of {', '.join(RATINGS)}, not {rating!r}")
    check_name("model", model)
    path = ratings_csv(Path(root), rater)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    entry = Rating(patch, model, rating, now())
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(RATING_FIELDS)
        writer.writerow([entry.patch, entry.model, entry.rating, entry.time])
        f.flush()
        os.fsync(f.fileno())
    return entry


def read_ratings(root: str | os.PathLike[str], rater: str) -> dict[tuple[str, str], str]:
    """(patch, model) -> rating of one rater, the last line winning; a half-written last line is skipped."""
    path = ratings_csv(Path(root), rater)
    if not path.exists():
        return {}
    out: dict[tuple[str, str], str] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("rating") in RATINGS and row.get("patch") and row.get("model"):
                out[(row["patch"], row["model"])] = row["rating"]
    return out


def raters(root: str | os.PathLike[str]) -> list[str]:
    folder = Path(root) / "ratings"
    return sorted(p.stem for p in folder.glob("*.csv")) if folder.is_dir() else []


# --- CSV helpers ---------------------------------------------------------------------------------------------


def _read_csv(path: Path, fields: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = sorted(set(fields) - set(reader.fieldnames or ()))
            if missing:
                raise ReviewError(f"{path}: missing columns {', '.join(missing)}")
            return list(reader)
    except FileNotFoundError:
        raise ReviewError(f"{path.parent}: not a review project (no {path.name})") from None


def _write_csv(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_output(path) as tmp:
        tmp.write_text(text.getvalue())


def read_rows(path: Path, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of a project CSV (predictions.csv, corrections.csv); none when it does not exist yet."""
    return _read_csv(path, fields) if path.exists() else []


def append_row(path: Path, fields: tuple[str, ...], row: dict) -> None:
    """One row appended, flushed and fsynced; the header written first into a new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())
