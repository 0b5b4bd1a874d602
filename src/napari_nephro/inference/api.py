"""Segment a region into memory, or a whole slide (or region) into a file, with any `Segmenter`."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common.lock import Locked, exclusive
from ..io import Slide
from ..tiling import best_level
from .engine import Progress, RunStats, channels_of, check_memory, run_tiles
from .errors import SegmentError
from .object_sink import CAP_ROWS, STATE_KEY, ObjectSink
from .objects import ObjectRules, clean_with_summary
from .output import ArraySink, ZarrRunStore, check_output, finish, partial_path
from .plan import WORKING, Plan, cells, make_plan, output_mpp, slide_mpp
from .summary import ObjectSummary, summarize

MAX_REGION_BYTES = 2 * 1024**3  # a region result beyond this goes to a file instead
HELD_ROWS = 8 * CAP_ROWS  # output rows an `ObjectSink` may hold at worst: 2 caps, raw and cleaned, with room to grow
MODEL = "model"  # `objects=MODEL`: the rules in the model's config (none for models without)


@dataclass
class RegionResult:
    """Class ids (H, W) uint8, or probabilities (C, H, W), over `region` at `out_downsample`."""

    array: np.ndarray
    region: tuple[int, int, int, int]  # x, y, width, height in level-0 pixels
    out_downsample: float  # level-0 pixels per array pixel
    mpp: float  # micrometres per array pixel
    classes: dict[int, str]  # label value -> class name
    stats: RunStats
    summary: ObjectSummary | None = None  # what was found; None for probabilities or a cancelled run


@dataclass
class SlideResult:
    path: Path | None  # the finished output; None when the run was cancelled
    partial: Path  # where an unfinished run is kept for --resume
    rows_done: int
    rows: int
    stats: RunStats
    summary: ObjectSummary | None = None  # what was found; None until the run is complete
    out_downsample: float | None = None  # level-0 pixels per output pixel; None when nothing was run
    mpp: float | None = None  # micrometres per output pixel


def classes_of(segmenter) -> dict[int, str]:
    """Label value -> class name of what `segmenter` predicts (0 is background)."""
    return {i: name for i, name in enumerate(segmenter.classes, start=1)}


def plan_run(
    slide: Slide,
    segmenter,
    region: tuple[float, float, float, float] | None = None,
    out_downsample: float | str = 1.0,
    tile: int | None = None,
    overlap: int | None = None,
    skip_background: bool = True,
) -> Plan:
    """The tiles a run would compute (`len(plan.tiles) - plan.skipped` hold tissue): for estimates before a run.

    `out_downsample`: level-0 pixels per output pixel, or WORKING / FULL (see `resolve_downsample`)."""
    return make_plan(
        slide,
        model_mpp=float(segmenter.mpp),
        tile=int(segmenter.tile_size if tile is None else tile),
        overlap=int(getattr(segmenter, "overlap", 0) if overlap is None else overlap),
        region=region,
        out_downsample=out_downsample,
        skip_background=skip_background,
    )


def segment_region(
    slide: Slide,
    segmenter,
    region: tuple[float, float, float, float] | None = None,
    *,
    out_downsample: float | str = 1.0,
    threshold: float = 0.5,
    probabilities: bool = False,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    readers: int | None = None,
    skip_background: bool = True,
    objects: ObjectRules | str | None = MODEL,
    progress: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> RegionResult:
    """Run `segmenter` over `region` (x, y, w, h in level-0 pixels; default the whole slide) into memory.

    `objects`: rules that make the pixel map whole objects (`MODEL`: the model's
    own, None: the pixel map as it is). A cancelled run returns what it finished
    (`stats.complete` is False, nothing cleaned); rows it did not reach are background.
    """
    _check_threshold(threshold)
    rules = rules_of(segmenter, objects)
    plan = plan_run(slide, segmenter, region, out_downsample, tile, overlap, skip_background)
    check_memory(plan, channels_of(segmenter), batch_size, readers, _level_ratio(slide, plan))
    height, width = plan.out_shape
    channels = channels_of(segmenter)
    size = height * width * (4 * channels if probabilities else 1)
    if size > MAX_REGION_BYTES:
        raise SegmentError(
            f"the result of a {width} x {height} region would take {size / 1024**3:.1f} GiB of memory: "
            "write it to a file (nephro segment --out, or 'whole slide' in napari) or use a coarser output"
        )
    sink = ArraySink((height, width), channels, probabilities=probabilities, threshold=threshold)
    stats = run_tiles(
        slide, segmenter, plan, sink, batch_size=batch_size, readers=readers, progress=progress, cancel=cancel
    )
    mpp = output_mpp(slide_mpp(slide), plan.out_downsample)
    classes, array, summary = classes_of(segmenter), sink.array, None
    if stats.complete and not probabilities:
        if rules is not None:
            array, summary = clean_with_summary(array, mpp, rules, classes, out=array)
        else:
            summary = summarize(array, mpp, classes)
        _describe_place(summary, slide, plan)
    return RegionResult(array, plan.region, plan.out_downsample, mpp, classes, stats, summary)


def rules_of(segmenter, objects: ObjectRules | str | None) -> ObjectRules | None:
    """The object rules a run applies: the model's (`MODEL`), those given, or none."""
    if objects == MODEL:
        rules = getattr(segmenter, "objects", None)
        return rules if isinstance(rules, ObjectRules) else None
    if objects is None or isinstance(objects, ObjectRules):
        return objects
    raise SegmentError(f"objects must be {MODEL!r}, None or ObjectRules, not {objects!r}")


def _describe_place(summary: ObjectSummary, slide: Slide, plan: Plan) -> None:
    """The tissue the run saw, and the slide's pixel size, for the summary's warning."""
    summary.slide_mpp = slide_mpp(slide)
    if plan.tissue_fraction is not None:
        _, _, w, h = plan.region
        summary.tissue_um2 = plan.tissue_fraction * w * h * summary.slide_mpp**2


def segment_slide(
    slide: Slide,
    segmenter,
    out: str | os.PathLike[str],
    *,
    region: tuple[float, float, float, float] | None = None,
    out_downsample: float | str = WORKING,
    threshold: float = 0.5,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    readers: int | None = None,
    skip_background: bool = True,
    objects: ObjectRules | str | None = MODEL,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[Progress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> SlideResult:
    """Run `segmenter` over the slide (or `region` of it) into `out`: .zarr, .tif or .geojson.

    The label image always has the whole slide's extent at `out_downsample`, so it
    overlays the slide in any viewer; a region only limits what is computed. By
    default (WORKING) it is on the model's own grid, its pixel size in the file's
    metadata: at 0.25 um/px full resolution (FULL) writes 16 pixels per pixel the
    model saw, which cost more than the model. Rows
    go to `<out>.partial.zarr` as they finish; cancelled or killed, the run keeps
    them and `resume=True` computes only the rest. `objects`: as for `segment_region`,
    applied as rows pass (`ObjectSink`); a resume must use the same rules.
    """
    _check_threshold(threshold)
    rules = rules_of(segmenter, objects)
    out = Path(out)
    if check_output(out, overwrite=overwrite, resume=resume):
        return _already_complete(out)
    plan = plan_run(slide, segmenter, region, out_downsample, tile, overlap, skip_background)
    check_memory(plan, channels_of(segmenter), batch_size, readers, _level_ratio(slide, plan), held_rows=HELD_ROWS)
    try:
        with exclusive(out):  # a second run on the same output refuses instead of deleting our files
            if check_output(out, overwrite=overwrite, resume=resume, locked=True):  # finished while we planned
                return _already_complete(out)
            return _run_into_store(
                slide, segmenter, plan, out, threshold, rules, batch_size, readers, resume, overwrite, progress, cancel
            )
    except Locked as exc:
        raise SegmentError(str(exc)) from None


def _already_complete(out: Path) -> SlideResult:
    return SlideResult(out, partial_path(out), 0, 0, RunStats(0, 0, 0, 0.0, 0.0, True))


def _run_into_store(
    slide: Slide,
    segmenter,
    plan: Plan,
    out: Path,
    threshold: float,
    rules: ObjectRules | None,
    batch_size: int,
    readers: int | None,
    resume: bool,
    overwrite: bool,
    progress: Callable[[Progress], None] | None,
    cancel: Callable[[], bool] | None,
) -> SlideResult:
    mpp = slide_mpp(slide)
    out_mpp = output_mpp(mpp, plan.out_downsample)  # um per output pixel
    classes = classes_of(segmenter)
    identity = _json(
        {
            "slide": slide.source.name,
            "slide_shape": list(slide.level_shapes[0]),
            "slide_mpp": round(mpp, 9),
            "model": getattr(segmenter, "fingerprint", type(segmenter).__name__),
            "plan": plan.describe(),
            "threshold": threshold,
            "object_rules": None if rules is None else rules.to_config(),
            # a network's output changes in its last bits with the batch and the device: a resume with
            # other ones would join two slightly different runs
            "batch": batch_size,
            "device": _device_name(segmenter),
        }
    )
    partial = partial_path(out)
    if resume:
        store = ZarrRunStore.reopen(partial, identity, threshold)
    else:
        d = plan.out_downsample
        height, width = slide.level_shapes[0]
        full = (cells(height, d), cells(width, d))
        offset = (round(plan.region[1] / d), round(plan.region[0] / d))
        record = {
            **identity,
            "classes": {str(k): v for k, v in classes.items()},
            "rows": plan.out_shape[0],
            "cols": plan.out_shape[1],
            "name": f"{Path(slide.source).stem} {', '.join(segmenter.classes)}",
        }
        try:
            store = ZarrRunStore.create(partial, full, offset, record, threshold, mpp=out_mpp)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # a disk full or Ctrl-C while laying it out
            raise
    rows = plan.out_shape[0]
    sink = ObjectSink(store, rules, out_mpp, rows, classes=classes, state=store.record.get(STATE_KEY))
    store.extra_record = lambda done: {STATE_KEY: sink.state(done)}
    try:
        stats = run_tiles(
            slide, segmenter, plan, sink, batch_size=batch_size, readers=readers, progress=progress, cancel=cancel
        )
    except BaseException:
        if not resume and store.rows_done == 0:  # failed before any row: nothing worth resuming
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if store.rows_done < rows:
        return SlideResult(None, partial, store.rows_done, rows, stats, None, plan.out_downsample, out_mpp)
    summary = sink.summary()
    _describe_place(summary, slide, plan)
    store.record.pop(STATE_KEY, None)  # only a partial run needs it
    path = finish(store, out, mpp=out_mpp, classes=classes, overwrite=overwrite)
    return SlideResult(path, partial, rows, rows, stats, summary, plan.out_downsample, out_mpp)


def _device_name(segmenter) -> str:
    """'cpu', 'cuda', 'mps': a torch.device's type, or whatever the segmenter says it runs on."""
    device = getattr(segmenter, "device", None)
    return str(getattr(device, "type", device))


def _level_ratio(slide: Slide, plan: Plan) -> float:
    """Pixels read at the slide level a tile comes from, per working pixel (1 when a level has the model's scale)."""
    return plan.scale / slide.level_downsamples[best_level(slide, plan.scale)]


def _check_threshold(threshold: float) -> None:
    if not 0 < threshold < 1:
        raise SegmentError(f"the threshold must be between 0 and 1, not {threshold}")


def _json(value):
    return json.loads(json.dumps(value))
