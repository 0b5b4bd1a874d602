"""Review projects from start to status: sample patches in tissue, run every model on them, resume, add a model.

What `nephro review new / predict / status` and the Review widget call. The
project's format is `review.layout`; sampling is `review.sampling`; predicting is
`review.predict`. Everything a user can get wrong (a slide that does not open, a
model that does not load, too many patches, a folder that exists) is refused as
one ReviewError line before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from ..common.limits import mpp_problem, tile_problem
from ..io import Slide, SlideError, open_slide
from ..review import predict
from ..review.layout import (
    ModelEntry,
    Project,
    ReviewError,
    SlideEntry,
    check_name,
    is_project,
    now,
    patch_png,
    raters,
    read_patches,
    read_project,
    read_ratings,
    write_patches,
    write_project,
)
from ..review.sampling import SAMPLINGS, safe_name, sample_patches, slide_ids
from ..tiling import read_scaled

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]
PNG_LEVEL = 1  # fast zlib: patches are written once and read many times


def new_project(
    root: str | os.PathLike[str],
    slides: Sequence[str | os.PathLike[str]],
    models: Sequence[str],
    *,
    patches: int = 200,
    size: int = 512,
    mpp: float | None = None,
    seed: int = 0,
    sampling: str = "random",
    task: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    slide_mpp: float | None = None,
) -> Path:
    """Make the review project `root`: `patches` patches of `size` px at `mpp` um/px in the tissue of `slides`,
    and every model's prediction on each; returns `root`.

    models: "SPEC" or "NAME=SPEC", as `--model` takes them (e.g. `nuclei`,
    `cellpose:cyto3`, `ft=nuclei:runs/ft1`, a glomerulus checkpoint folder or
    `default`); NAME defaults to the family, or the folder's name, made unique.
    task: "nuclei" or "glomeruli", found from the models when None (mixing them is
    refused). mpp: default the first model's working scale. sampling: "random"
    (pooled over the slides) or "stratified" (as many per slide). slide_mpp: the
    pixel size of slides that state none (PNG, JPEG).

    The slides are opened and the models loaded first, so a mistake costs
    nothing; then project.json, patches.csv and the patch PNGs are written in one
    piece, and only then the predictions, one by one: a crash or a cancel
    (`cancel()` True) midway is resumed with `predict_project`. progress(done,
    total, text) counts predictions. An existing folder is refused unless
    `overwrite` (which replaces a review project, never another folder).
    """
    root = Path(root)
    _check_target(root, overwrite)
    if sampling not in SAMPLINGS:
        raise ReviewError(f"sampling must be one of {', '.join(SAMPLINGS)}, not {sampling!r}")
    if isinstance(patches, bool) or not isinstance(patches, int) or patches < 1:
        raise ReviewError(f"the number of patches must be a whole number of at least 1, not {patches!r}")
    problem = tile_problem(size, "patch") or (mpp_problem(mpp, "patches") if mpp is not None else None)
    if problem:
        raise ReviewError(problem)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ReviewError(f"the seed must be a whole number, not {seed!r}")
    if not slides:
        raise ReviewError("no slides given: a project samples its patches from at least one slide")
    named = parse_models(models)
    tasks = {predict.task_of(spec) for _, spec in named}
    if len(tasks) > 1:
        nuclei = [n or s for n, s in named if predict.task_of(s) == "nuclei"]
        raise ReviewError(
            f"{', '.join(nuclei)} segment nuclei and the others glomeruli: a project rates one kind; make two projects"
        )
    found = tasks.pop()
    if task is not None and task != found:
        raise ReviewError(f"task {task!r}, but the models segment {found}: give {found} models, or task {found!r}")
    task = found
    opened = _open_slides(slides, slide_mpp)
    loaded: dict[str, object] = {}
    try:
        entries = _load_models(named, task, device, loaded, taken=[])
        mpp = float(mpp if mpp is not None else entries[0].mpp)
        problem = mpp_problem(mpp, "patches")
        if problem:
            raise ReviewError(f"{problem} (the scale of model {entries[0].name}): give mpp")
        ids = slide_ids([p for p, _ in opened])
        chosen = sample_patches(
            [(i, s) for i, (_, s) in zip(ids, opened, strict=True)], patches, size, mpp, seed, sampling
        )
        project = Project(
            task=task,
            size=size,
            mpp=mpp,
            seed=seed,
            sampling=sampling,
            slides=[SlideEntry(i, str(p), s.mpp) for i, (p, s) in zip(ids, opened, strict=True)],
            models=entries,
            created=now(),
        )
        _write_project(root, project, chosen, dict(zip(ids, (s for _, s in opened), strict=True)))
        for _, slide in opened:  # prediction opens its own, as a resumed run does
            slide.close()
        opened = []
        predict.run_predictions(root, loaded=loaded, device=device, progress=progress, cancel=cancel)
    finally:
        predict.close(loaded.values())
        for _, slide in opened:
            slide.close()
    return root


def predict_project(
    root: str | os.PathLike[str],
    *,
    device: str = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> int:
    """Finish the project's predictions (after a crash, a cancel, or `nephro review predict`); the number made.

    Every (patch, model) with its predictions.csv row and its label file is kept;
    the rest are made, with the same results an uninterrupted run gives. A model
    whose weights changed since its first predictions is refused (ReviewError).
    Whether all are done: `project_status(root)["complete"]`.
    """
    return predict.run_predictions(root, device=device, progress=progress, cancel=cancel)


def add_model(
    root: str | os.PathLike[str],
    spec: str,
    name: str | None = None,
    *,
    device: str = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> ModelEntry:
    """Add a model (a fine-tuned checkpoint, for a second round) to the project and predict every patch with it.

    spec: as for `new_project` ("SPEC" or "NAME=SPEC"); `name` overrides. It must
    segment what the project's models segment, and must not be weights the
    project already has. Returns its project.json entry; a cancelled run is
    finished with `predict_project`.
    """
    root = Path(root)
    project = read_project(root)
    given, spec = _split(spec)
    name = name or given
    if name is not None and name in project.model_names:
        raise ReviewError(f"model {name} is already in the project: give the new one another name")
    loaded: dict[str, object] = {}
    try:
        (entry,) = _load_models([(name, spec)], project.task, device, loaded, taken=project.model_names)
        for other in project.models:
            if other.fingerprint == entry.fingerprint:
                raise ReviewError(f"{spec}: these weights are already in the project as model {other.name}")
        project.models.append(entry)
        write_project(root, project)
        predict.run_predictions(
            root, models=[entry.name], loaded=loaded, device=device, progress=progress, cancel=cancel
        )
    finally:
        predict.close(loaded.values())
    return entry


def project_status(root: str | os.PathLike[str]) -> dict:
    """Where the project stands: its patches, models, predictions done per model, and raters.

    Keys: project, task, size, mpp, sampling, slides, patches, models (names),
    predictions ({model: done}), complete (every prediction made), raters
    ({rater: patches rated for every model}).
    """
    root = Path(root)
    project = read_project(root)
    patches = read_patches(root)
    finished = predict.done_predictions(root)
    done = {m: sum((p.patch, m) in finished for p in patches) for m in project.model_names}
    names = [p.patch for p in patches]
    rated = {}
    for rater in raters(root):
        ratings = read_ratings(root, rater)
        rated[rater] = sum(all((p, m) in ratings for m in project.model_names) for p in names)
    return {
        "project": str(root),
        "task": project.task,
        "size": project.size,
        "mpp": project.mpp,
        "sampling": project.sampling,
        "slides": len(project.slides),
        "patches": len(patches),
        "models": project.model_names,
        "predictions": done,
        "complete": all(done[m] == len(patches) for m in project.model_names),
        "raters": rated,
    }


# --- helpers -------------------------------------------------------------------------------------------------


def parse_models(models: Sequence[str]) -> list[tuple[str | None, str]]:
    """(NAME or None, SPEC) for each "SPEC" or "NAME=SPEC"; a NAME given twice is refused."""
    if isinstance(models, str):
        models = [models]
    if not models:
        raise ReviewError("no models given: a project rates at least one model's predictions")
    named = [_split(m) for m in models]
    given = [n for n, _ in named if n is not None]
    twice = sorted({n for n in given if given.count(n) > 1})
    if twice:
        raise ReviewError(f"model name {twice[0]} is given twice: each model needs its own name")
    return named


def _split(text: str) -> tuple[str | None, str]:
    """ "NAME=SPEC" -> (NAME, SPEC); a spec alone (or a path that holds '=') -> (None, SPEC)."""
    text = str(text).strip()
    head, sep, rest = text.partition("=")
    if not sep or Path(text).exists() or not rest.strip():
        if not text:
            raise ReviewError("an empty model spec: give SPEC or NAME=SPEC")
        return None, text
    return check_name("model", head.strip()), rest.strip()


def default_name(spec: str) -> str:
    """The name a model gets when none is given: its folder's (or file's) name, else its family (`cellpose`,
    `cellpose-cyto3`, `default`)."""
    from ..models.nuclei import family_of

    family = family_of(spec)
    head, _, rest = spec.partition(":")
    named = family is not None and head.strip().lower() == family
    path = rest if named else spec
    if path and Path(path).exists():
        target = Path(path).resolve()
        return safe_name(target.name if target.is_dir() else target.stem, family or "model")
    if named and rest and ("/" in rest or "\\" in rest):  # a path that is not there (yet): its name still says most
        return safe_name(Path(rest).stem, family)
    if named:
        return safe_name(f"{family}-{rest}" if rest else family, family)
    return safe_name(Path(spec).name, "model")


def _load_models(
    named: list[tuple[str | None, str]], task: str, device: str, loaded: dict, taken: list[str]
) -> list[ModelEntry]:
    """Load each model (kept in `loaded` by name) and describe it; names not given are made unique."""
    taken = list(taken) + [n for n, _ in named if n is not None]
    entries = []
    for name, spec in named:
        if name is None:
            base = default_name(spec)
            name, i = base, 2
            while name in taken:
                name, i = f"{base}-{i}", i + 1
            taken.append(name)
        segmenter = predict.load_segmenter(spec, task, device=device, name=name)
        loaded[name] = segmenter
        entries.append(predict.model_entry(name, spec, segmenter, task))
    return entries


def _check_target(root: Path, overwrite: bool) -> None:
    if not root.exists() and not root.is_symlink():
        return
    if root.is_dir() and not any(root.iterdir()):
        return
    if not overwrite:
        raise ReviewError(
            f"{root}: already exists; pass --overwrite to replace it, or finish its predictions with "
            f"nephro review predict {root}"
        )
    if not is_project(root):
        raise ReviewError(f"{root}: exists and is not a review project: choose another folder (it is not replaced)")


def _open_slides(paths: Sequence[str | os.PathLike[str]], mpp: float | None) -> list[tuple[Path, Slide]]:
    """Every slide opened, with a known pixel size (`mpp` for those that state none), before anything is written;
    the first that fails is one line."""
    if mpp is not None:
        problem = mpp_problem(mpp, "slides")
        if problem:
            raise ReviewError(problem)
    opened: list[tuple[Path, Slide]] = []
    try:
        for path in paths:
            path = Path(path).expanduser().absolute()
            try:
                slide = open_slide(path)
                if slide.mpp is None and mpp is not None:  # `mpp` is for the slides that state none
                    slide.close()
                    slide = open_slide(path, mpp=mpp)
            except SlideError as exc:
                raise ReviewError(str(exc)) from None
            opened.append((path, slide))
            if slide.mpp is None:
                raise ReviewError(
                    f"{path.name}: its pixel size is unknown; give the micrometres per pixel of its full resolution "
                    "(--image-mpp in the shell, the mpp box in napari)"
                )
    except BaseException:
        for _, slide in opened:
            slide.close()
        raise
    return opened


def _write_project(root: Path, project: Project, patches: list, slides: dict[str, Slide]) -> None:
    """project.json, patches.csv and the patch PNGs, renamed into place together: never a project without
    all its patches."""
    from ..common.atomic import atomic_output

    root.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(root) as tmp:
        (tmp / "patches").mkdir(parents=True)
        for patch in patches:
            rgb = read_scaled(slides[patch.slide], (patch.x, patch.y, patch.width, patch.height), (project.size,) * 2)
            Image.fromarray(rgb).save(patch_png(tmp, patch.patch), compress_level=PNG_LEVEL)
        write_patches(tmp, patches)
        write_project(tmp, project)
