"""A cohort of slides through one or more models on a dask cluster, resumably, with a report per biopsy.

One task per (slide, model) runs the ordinary whole-slide engine on a worker; one
task per slide then turns that slide's outputs into its report (a CSV row and an
HTML page); the client writes the cohort's CSV and HTML index. Everything a task
writes goes through the engine's partial stores and atomic renames, so:

- a finished (slide, model) is skipped on a rerun; an unfinished one is resumed
  from its `.partial.zarr` and ends identical to an uninterrupted run;
- a worker killed mid-slide (the process, not an error) is retried elsewhere by
  dask (`distributed.scheduler.allowed-failures`), and the retry resumes the rows
  the dead worker wrote; its file lock died with it;
- a slide that cannot be read, or fails, becomes one row with its error, and the
  other slides go on.

The cluster is a `LocalCluster` of processes by default, or any running scheduler
(`scheduler="tcp://..."`): SLURM through dask-jobqueue, GPUs through dask-cuda,
with no code of ours (docs/batch.md). A cohort folder records its models
(batch.json); the same folder with other models is refused rather than mixed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..common.atomic import atomic_output
from ..common.json_io import JSONFileError, read_json
from ..io.open import SLIDE_EXTENSIONS

BATCH_JSON = "batch.json"
TOPIC = "napari-nephro-batch"  # worker -> client events: tiles done per (slide, model)
EVENT_SECONDS = 0.5  # at most one tile event per task this often
RESULT_SUFFIX = ".zarr"


class BatchError(Exception):
    """A mistake in what to run or where (not one slide failing): one line."""


@dataclass(frozen=True)
class SlideItem:
    """One slide of the cohort: its file, its name in the outputs, and its pixel size when the file lacks it."""

    path: Path
    name: str
    mpp: float | None = None


@dataclass(frozen=True)
class ModelItem:
    """One model of the run: what the user named (`spec`), its folder name in the outputs, and its task."""

    spec: str
    name: str
    task: str  # "glomeruli" or "nuclei"
    fingerprint: str | None = None  # of a checkpoint folder; None for a family name (cellpose:cyto3 ...)


@dataclass
class BatchResult:
    """The cohort's table (one row per slide, the report's columns and an `error`), and where it was written."""

    rows: list[dict]
    out: Path
    csv: Path
    index: Path
    runs: list[dict] = field(default_factory=list)  # one per (slide, model): status, seconds, tiles

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r.get("error")]


# --- what to run ---------------------------------------------------------------------------------------------


def read_slides(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[SlideItem]:
    """Slides from a folder (every slide file and DICOM folder in it), a CSV (`slide` column, optional `mpp` and
    `name`; paths relative to the CSV), or a list of paths. Names are file stems, made unique."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise BatchError(f"{path}: no such file or folder")
        if path.is_dir() and not _is_dicom_folder(path):
            items = [SlideItem(p, p.name) for p in sorted(path.iterdir()) if _is_slide(p)]
            if not items:
                raise BatchError(f"{path}: no slide in this folder (looked for {', '.join(SLIDE_EXTENSIONS[:6])}...)")
        elif path.suffix.lower() == ".csv":
            items = _slides_from_csv(path)
        else:
            items = [SlideItem(path, path.name)]
    else:
        items = [SlideItem(Path(p).expanduser(), Path(p).name) for p in source]
        if not items:
            raise BatchError("no slide given")
    return _unique_names(items)


def _is_slide(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return _is_dicom_folder(path) or path.suffix.lower() == ".mrxs"
    return path.name.lower().endswith(SLIDE_EXTENSIONS) or path.suffix.lower() == ".dcm"


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir())


def _slides_from_csv(path: Path) -> list[SlideItem]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "slide" not in reader.fieldnames:
            raise BatchError(f"{path}: a slide list needs a 'slide' column (and optionally 'mpp' and 'name')")
        rows = list(reader)
    items = []
    for line, row in enumerate(rows, start=2):
        text = (row.get("slide") or "").strip()
        if not text:
            raise BatchError(f"{path}, line {line}: the slide is empty")
        slide = Path(text).expanduser()
        slide = slide if slide.is_absolute() else path.parent / slide
        mpp = (row.get("mpp") or "").strip()
        try:
            value = float(mpp) if mpp else None
        except ValueError:
            raise BatchError(f"{path}, line {line}: mpp {mpp!r} is not a number") from None
        if value is not None and not (math.isfinite(value) and value > 0):
            raise BatchError(f"{path}, line {line}: mpp must be a positive number, not {mpp}")
        items.append(SlideItem(slide, (row.get("name") or "").strip() or slide.name, value))
    if not items:
        raise BatchError(f"{path}: the slide list is empty")
    return items


def _unique_names(items: list[SlideItem]) -> list[SlideItem]:
    """Output folder names: the stem (without the slide suffix), made safe, and numbered when two collide."""
    seen: dict[str, int] = {}
    out = []
    for item in items:
        stem = item.name
        for suffix in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "slide"
        n = seen.get(stem.lower(), 0)
        seen[stem.lower()] = n + 1
        out.append(SlideItem(item.path, stem if n == 0 else f"{stem}-{n + 1}", item.mpp))
    return out


def model_items(specs: Sequence[str]) -> list[ModelItem]:
    """The models to run, with a folder name each; a checkpoint folder is fingerprinted so its weights are known."""
    from ..models.checkpoint import DEFAULT, DEFAULT_FOLDER
    from ..models.hover_segmenter import DEFAULT_NUCLEI_FOLDER
    from ..models.segmenter import checkpoint_fingerprint
    from ..review.predict import task_of

    shipped = {DEFAULT: DEFAULT_FOLDER, "nuclei": DEFAULT_NUCLEI_FOLDER}  # the package's own, by name

    if not specs:
        raise BatchError("give at least one --model")
    items, names = [], set()
    for spec in specs:
        spec = str(spec)
        folder = Path(spec.partition(":")[2] or spec)  # `nuclei:FOLDER`, or the folder itself
        checkpoint = folder.is_dir() and (folder / "config.json").exists()
        fingerprint = None
        if checkpoint or spec in shipped:
            fingerprint = checkpoint_fingerprint(folder if checkpoint else shipped[spec])
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.name if checkpoint else spec).strip("-.")
        base, n = name or "model", 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.add(name)
        items.append(ModelItem(spec, name, task_of(spec), fingerprint))
    return items


def check_cohort_folder(out: Path, models: list[ModelItem], out_scale: str) -> None:
    """Refuse a cohort folder that holds another run's models or scale; record ours in a new one."""
    record = {
        "models": [{"spec": m.spec, "name": m.name, "task": m.task, "fingerprint": m.fingerprint} for m in models],
        "out_scale": out_scale,
    }
    path = out / BATCH_JSON
    if out.exists() and not out.is_dir():
        raise BatchError(f"{out}: is a file; give a folder for the cohort's results")
    if path.exists():
        try:
            old = read_json(path)
        except JSONFileError as exc:
            raise BatchError(f"{path}: {exc}") from None
        if old != record:
            was = ", ".join(m.get("spec", "?") for m in old.get("models", []))
            raise BatchError(
                f"{out}: holds a cohort run with other models or options (models {was}, scale {old.get('out_scale')}); "
                "give another --out, or the same models"
            )
        return
    if out.exists() and any(p.name != BATCH_JSON and not p.name.startswith(".") for p in out.iterdir()):
        raise BatchError(f"{out}: is not empty and is not a cohort folder of napari-nephro; give a new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))


def output_path(out: Path, slide: SlideItem, model: ModelItem) -> Path:
    return out / slide.name / f"{model.name}{RESULT_SUFFIX}"


# --- on a worker -----------------------------------------------------------------------------------------------

_MODELS: dict[tuple[str, str], object] = {}  # per worker process: loaded once, used for every slide
_MODELS_LOCK = threading.Lock()


def _segmenter(model: ModelItem, device: str):
    from ..review.predict import load_segmenter

    key = (model.spec, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_segmenter(model.spec, model.task, device=device)
        return _MODELS[key]


def _share_cores(per_host: dict[str, int]) -> None:
    """Torch threads for this task: the machine's cores shared among the workers on it (two workers on a laptop
    must not each take every core). Set per task, since a worker restarted after a crash starts afresh."""
    import torch
    from distributed import get_worker

    try:
        host = _host(get_worker().address)
    except ValueError:  # not on a worker
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, per_host.get(host, 1))))


def _host(address: str) -> str:
    """'tcp://10.0.0.5:40123' -> '10.0.0.5': the machine a worker runs on."""
    return address.rsplit(":", 1)[0].split("://")[-1]


def _tell(slide: str, model: str, done: int, total: int) -> None:
    """A tile event to the client's progress bar; nothing when not on a dask worker (a plain call)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    worker.log_event(TOPIC, {"slide": slide, "model": model, "done": done, "total": total, "pid": os.getpid()})


def run_slide_model(
    slide: SlideItem,
    model: ModelItem,
    out: Path,
    device: str = "auto",
    out_scale: str = "working",
    workers_per_host: dict[str, int] | None = None,
):
    """One model on one slide into its output, skipping a finished one and resuming an unfinished one.

    Returns a plain record (status, seconds, tiles, error); a slide's own failure is its record's `error`,
    so one bad slide does not fail the cohort. Runs on a worker, or in-process for a single slide.
    `workers_per_host`: how many workers share each machine, so each takes its share of the cores.
    """
    from ..inference import partial_path
    from ..inference.api import segment_slide
    from ..inference.instance_api import segment_instances_slide
    from ..io import open_slide

    target = output_path(out, slide, model)
    record = {"slide": slide.name, "model": model.name, "output": str(target), "status": "", "seconds": 0.0}
    record.update(tiles=0, predicted=0, error=None)
    if target.exists():
        return {**record, "status": "skipped"}
    t0 = time.perf_counter()
    last = [0.0]

    def progress(p) -> None:
        now = time.perf_counter()
        if now - last[0] >= EVENT_SECONDS or p.done >= p.total:
            last[0] = now
            _tell(slide.name, model.name, p.done, p.total)

    resume = partial_path(target).exists()
    if workers_per_host:
        _share_cores(workers_per_host)
    try:
        segmenter = _segmenter(model, device)
        target.parent.mkdir(parents=True, exist_ok=True)
        run = segment_instances_slide if model.task == "nuclei" else segment_slide
        options = {} if model.task == "nuclei" else {"objects": "model"}
        with open_slide(slide.path, mpp=slide.mpp) as opened:  # a long-lived worker must not keep every slide open
            result = run(
                opened,
                segmenter,
                target,
                out_downsample=out_scale,
                batch_size=getattr(segmenter, "tiles_per_call", None) or 4,
                resume=resume,
                progress=progress,
                **options,
            )
    except Exception as exc:  # one slide's failure is its row, not the cohort's end
        return {**record, "status": "failed", "error": _one_line(exc), "seconds": time.perf_counter() - t0}
    stats = result.stats
    record.update(status="resumed" if resume else "done", seconds=time.perf_counter() - t0)
    record.update(tiles=stats.tiles, predicted=stats.predicted)
    return record


def report_slide(slide: SlideItem, models: list[ModelItem], runs: list[dict], out: Path):
    """The slide's `BiopsyReport` (and its HTML page) from its outputs: the first glomerulus and nuclei model's."""
    from ..io import open_slide
    from ..report import BiopsyReport, biopsy_report, write_biopsy_html

    failed = [r for r in runs if r.get("error")]
    if failed:
        return BiopsyReport.failed(slide.name, "; ".join(f"{r['model']}: {r['error']}" for r in failed))
    outputs = {}
    for model in models:
        outputs.setdefault(model.task, output_path(out, slide, model))
    try:
        with open_slide(slide.path, mpp=slide.mpp) as opened:
            report = biopsy_report(opened, glomeruli=outputs.get("glomeruli"), nuclei=outputs.get("nuclei"))
            report.slide = slide.name
            write_biopsy_html(report, out / slide.name / "report.html", slide=opened)  # from what the report kept
    except Exception as exc:
        return BiopsyReport.failed(slide.name, f"report: {_one_line(exc)}")
    report.placed = report.tissue = None  # the page is drawn: only the numbers go back to the client
    return report


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- on the client ---------------------------------------------------------------------------------------------


def local_cluster(workers: int | None = None, *, dashboard: bool = True):
    """A `LocalCluster` of worker processes (one task at a time each) on this machine."""
    from distributed import LocalCluster

    cores = os.cpu_count() or 1
    return LocalCluster(
        n_workers=workers or max(1, min(cores, 4) // 2),
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0" if dashboard else None,
        silence_logs=40,  # errors only: the progress bar is the user's view
    )


def batch(
    slides: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    models: Sequence[str],
    out: str | os.PathLike[str],
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    client=None,
    device: str = "auto",
    out_scale: str = "working",
    progress: Callable[[int, int, dict], None] | None = None,
    on_dashboard: Callable[[str], None] | None = None,
) -> BatchResult:
    """Segment every slide with every model on a dask cluster, report each biopsy, and write the cohort's table.

    `client`: an existing `distributed.Client`; else `scheduler` (an address) or a new `LocalCluster` of
    `workers` processes, closed at the end. `progress(done_slides, total_slides, event)`: after each slide and
    on tile events (`event` holds slide, model, done, total). Returns the cohort's rows; a slide that failed is
    a row with its `error`, never an exception.
    """
    from distributed import Client

    if out_scale not in ("working", "full"):
        raise BatchError(f"out_scale must be 'working' or 'full', not {out_scale!r}")
    if workers is not None and workers < 1:
        raise BatchError(f"--workers must be at least 1, not {workers}")
    if scheduler is not None and workers is not None:
        raise BatchError("give --scheduler or --workers, not both: the scheduler's cluster has its own workers")
    out = Path(out).expanduser()
    items = read_slides(slides)
    chosen = model_items(models)
    check_cohort_folder(out, chosen, out_scale)
    cluster = None
    own = client is None
    if client is None:
        if scheduler is not None:
            try:
                client = Client(scheduler, timeout="20s")
            except OSError as exc:
                raise BatchError(f"cannot reach the dask scheduler at {scheduler}: {_one_line(exc)}") from None
        else:
            cluster = local_cluster(workers)
            client = Client(cluster)
    try:
        if on_dashboard is not None and client.dashboard_link:
            on_dashboard(client.dashboard_link)
        return _run(client, items, chosen, out, device, out_scale, progress)
    finally:
        if own:
            client.close()
            if cluster is not None:
                cluster.close()


def _run(client, items, chosen, out, device, out_scale, progress) -> BatchResult:
    from collections import Counter

    from distributed import as_completed

    per_host = dict(Counter(_host(address) for address in client.scheduler_info().get("workers", {})))
    done_slides = [0]
    lock = threading.Lock()

    def on_event(event) -> None:
        if progress is not None:
            _, message = event
            with lock:
                progress(done_slides[0], len(items), dict(message))

    client.subscribe_topic(TOPIC, on_event)
    try:
        runs, reports = {}, []
        for item in items:
            runs[item.name] = [
                client.submit(
                    run_slide_model, item, m, out, device, out_scale, per_host, key=f"segment-{item.name}-{m.name}"
                )
                for m in chosen
            ]
            reports.append(
                client.submit(report_slide, item, chosen, runs[item.name], out, key=f"report-{item.name}", pure=False)
            )
        rows, by_future = {}, {f: item for f, item in zip(reports, items, strict=True)}
        for future in as_completed(reports):
            item = by_future[future]
            try:
                rows[item.name] = future.result()
            except Exception as exc:  # a task that dask gave up on (its workers kept dying): the slide's row
                from ..report import BiopsyReport

                rows[item.name] = BiopsyReport.failed(item.name, f"lost: {_one_line(exc)}")
            with lock:
                done_slides[0] += 1
                if progress is not None:
                    progress(done_slides[0], len(items), {"slide": item.name, "finished": True})
        records = []
        for item in items:
            for future in runs[item.name]:
                try:
                    records.append(future.result())
                except Exception as exc:
                    records.append({"slide": item.name, "status": "lost", "error": _one_line(exc)})
    finally:
        client.unsubscribe_topic(TOPIC)
    from ..report import write_cohort

    reports = [rows[item.name] for item in items]
    pages = {item.name: f"{item.name}/report.html" for item in items if (out / item.name / "report.html").exists()}
    csv_path, index = write_cohort(reports, out, pages=pages)
    return BatchResult([r.row() for r in reports], out, csv_path, index, records)
