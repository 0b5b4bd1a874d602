"""`nephro`: the plugin's operations from a shell.

User mistakes (a missing file, a file that is not a slide) end in one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .annotations import AnnotationError
from .common.json_io import JSONFileError
from .inference.errors import SegmentError
from .inference.plan import FULL, WORKING
from .io import SlideError, open_slide
from .models import ARCHITECTURES, ModelError
from .pipelines import EvaluationError, ExportError
from .pipelines.batch import BatchError
from .pipelines.export import FORMATS, KEEP
from .prompts import PromptError
from .review import ReviewError
from .tiling import GridError
from .training.errors import TrainingError, resumable

EXIT_USAGE = 2


class UserError(Exception):
    """A wrong option value: printed as one line."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(_join_dash_values(sys.argv[1:] if argv is None else list(argv)))
    except SystemExit as exc:  # --help, --version, or an option error already printed in one line
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except (
        SlideError,
        AnnotationError,
        EvaluationError,
        ExportError,
        ModelError,
        SegmentError,
        TrainingError,
        PromptError,
        JSONFileError,
        GridError,
        ReviewError,
        BatchError,
        UserError,
    ) as exc:
        print(f"nephro: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `nephro info slide | head`: the reader has what it wanted; say nothing
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 128 + 13  # what a program killed by SIGPIPE returns
    except OSError as exc:  # a folder that is a file, no permission, a full disk: the system's words, one line
        print(f"nephro: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nephro: interrupted", file=sys.stderr)
        return 130


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line and a pointer to --help, not an 8-line usage block."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


VALUE_MAY_START_WITH_DASH = "--region"  # X,Y,W,H: a region may start left of or above the slide


def _join_dash_values(argv: list[str]) -> list[str]:
    """`--region -100,-100,400,400` as `--region=-100,...`: argparse takes a leading '-' for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        negative = i + 1 < len(argv) and argv[i + 1][:1] == "-" and argv[i + 1][1:2] in "0123456789."
        option = len(argv[i]) >= 5 and VALUE_MAY_START_WITH_DASH.startswith(argv[i])  # argparse takes `--reg`
        if option and negative and argv[i + 1][1:2]:
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _number(low: float | None = None, high: float | None = None, *, above: bool = False, below: bool = False):
    """An argparse type for a finite number in [low, high] (`above`: low excluded, `below`: high excluded)."""

    def parse(text: str) -> float:
        value = _finite(text)
        too_low = low is not None and (value <= low if above else value < low)
        too_high = high is not None and (value >= high if below else value > high)
        if too_low or too_high:
            if high is None:
                bound = "positive" if above and low == 0 else f"{'above' if above else 'at least'} {low:g}"
                raise argparse.ArgumentTypeError(f"must be {bound}, not {text}")
            span = f"{'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {span}, not {text}")
        return value

    parse.__name__ = "number"  # argparse names the type in its message
    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


POSITIVE = _number(0, above=True)
OPEN_FRACTION = _number(0, 1, above=True, below=True)
FRACTION = _number(0, 1)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nephro", description="Kidney pathology on whole-slide images.")
    parser.add_argument("--version", action="version", version=f"napari-nephro {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="describe a slide: format, levels, pixel size, tiles, associated images")
    info.add_argument("slide", help="slide file, DICOM WSI folder, or plain image")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--mpp", type=POSITIVE, help="level-0 micrometres per pixel, for files that do not say")
    info.set_defaults(func=cmd_info)

    ev = sub.add_parser("evaluate", help="compare predictions with ground truth: Dice, instance precision/recall/F1")
    ev.add_argument("--pred", required=True, help="prediction: GeoJSON, COCO, XML, label image, OME-Zarr, or a folder")
    ev.add_argument("--truth", required=True, help="ground truth: same formats; folders are matched by file stem")
    ev.add_argument(
        "--iou", type=_number(0, 1, above=True), default=0.5, help="IoU at which two objects match (default 0.5)"
    )
    ev.add_argument("--per-crop", action="store_true", help="also score each true object cut out with a 25%% margin")
    ev.add_argument("--shape", type=_shape, help="HEIGHT,WIDTH of the image when both sides are polygons")
    ev.add_argument("--slide", help="the slide or image annotated: its size, when both sides are polygons")
    ev.add_argument("--json", action="store_true", help="print everything as JSON")
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser(
        "export",
        help="convert annotations (GeoJSON, COCO, XML, label TIFF/PNG, OME-Zarr) or cut a training tile dataset",
    )
    ex.add_argument("input", help="annotation file, COCO file with many images, or a folder of annotation files")
    ex.add_argument("--to", required=True, choices=list(FORMATS), help="output format")
    ex.add_argument("--out", required=True, type=Path, help="output file, or folder for several images and for tiles")
    ex.add_argument("--slide", help="the slide or image annotated, or a folder of images matched by file stem")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ex.add_argument("--image-mpp", type=POSITIVE, help="micrometres per pixel of images that do not say")
    tiles = ex.add_argument_group("tile datasets (--to tiles)")
    tiles.add_argument("--tile", type=int, default=1024, help="tile size in pixels at --mpp (default 1024)")
    tiles.add_argument("--overlap", type=int, default=256, help="overlap between tiles in pixels (default 256)")
    tiles.add_argument("--mpp", type=POSITIVE, help="micrometres per pixel of the tiles (default: the image's own)")
    tiles.add_argument(
        "--keep", choices=KEEP, default="tissue", help="which tiles: with tissue (default), with objects, or all"
    )
    tiles.add_argument(
        "--values", choices=("class", "instance"), default="class", help="mask pixels hold class ids or object ids"
    )
    ex.set_defaults(func=cmd_export)

    seg = sub.add_parser("segment", help="run a segmentation model over a slide or a region of it, into a file")
    seg.add_argument("slide", help="slide file, DICOM WSI folder, or plain image")
    seg.add_argument(
        "--model",
        required=True,
        help="checkpoint folder (config.json + model.safetensors), 'default', seggpt[:FOLDER_OR_HF_ID] with "
        "--prompts; nuclei: 'nuclei' (the shipped model, offline on a CPU) or a folder from nephro train --task nuclei, "
        "cellpose[:nuclei|cyto3|cpsam|FILE], stardist[:FOLDER], cellvit:CHECKPOINT.pth",
    )
    seg.add_argument("--prompts", type=Path, help="SegGPT: prompt set folder (see `nephro prompts add`)")
    seg.add_argument(
        "--seggpt-mode",
        choices=("per_class", "palette"),
        default="per_class",
        help="SegGPT: one run per class (default) or one run with a colour per class",
    )
    seg.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output: .zarr (OME-Zarr labels), .tif, or .geojson; nuclei: .zarr (ids, table inside), .geojson "
        "(QuPath detections), .csv or .parquet (one row per nucleus)",
    )
    seg.add_argument("--region", type=_region, help="X,Y,W,H in level-0 pixels (default: the whole slide)")
    seg.add_argument(
        "--out-scale",
        choices=(WORKING, FULL),
        default=WORKING,
        help="pixel size of the label image: 'working' (default), the model's own, with the scale in the file so "
        "viewers place it over the slide; 'full', the slide's level 0 (16x the pixels for a 1 um/px model on a "
        "0.25 um/px slide, and most of the run's time). Tables and GeoJSON are in level-0 pixels either way",
    )
    seg.add_argument("--mpp", type=POSITIVE, help="level-0 micrometres per pixel, for slides that do not say")
    seg.add_argument("--tile", type=int, help="tile size at the model's mpp (default: the model's)")
    seg.add_argument("--overlap", type=int, help="overlap between tiles (default: the model's)")
    seg.add_argument(
        "--threshold",
        type=OPEN_FRACTION,
        default=0.5,
        help="foreground probability threshold (default 0.5)",
    )
    seg.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    seg.add_argument(
        "--batch",
        type=int,
        help="tiles per forward pass (default 4); SegGPT: tile x prompt pairs per pass (default 1 on CPU, 16 on CUDA)",
    )
    seg.add_argument(
        "--readers", type=int, help="threads reading tiles and resampling rows (default: one per core, 2 to 8)"
    )
    seg.add_argument("--all-tiles", action="store_true", help="also send tiles of bare glass to the model")
    seg.add_argument(
        "--no-objects",
        action="store_true",
        help="keep the raw pixel map: no hole filling, speck removal, splitting or smoothing by the model's rules",
    )
    nuc = seg.add_argument_group("nuclei models")
    nuc.add_argument(
        "--diameter", type=POSITIVE, help="Cellpose: typical nucleus diameter in um (default 7.5, kidney nuclei)"
    )
    nuc.add_argument("--flow-threshold", type=_finite, help="Cellpose: flow error threshold (default 0.4)")
    nuc.add_argument("--cellprob-threshold", type=_finite, help="Cellpose: cell probability threshold (default 0)")
    nuc.add_argument(
        "--prob-threshold",
        type=OPEN_FRACTION,
        help="StarDist, nuclei: object / nuclear probability (default: the model's)",
    )
    nuc.add_argument("--nms-threshold", type=OPEN_FRACTION, help="StarDist: overlap suppression (default: the model's)")
    seg.add_argument("--resume", action="store_true", help="finish an interrupted run (its .partial.zarr)")
    seg.add_argument("--overwrite", action="store_true", help="replace an existing output or unfinished run")
    seg.set_defaults(func=cmd_segment)

    tr = sub.add_parser(
        "train", help="train or fine-tune a glomerulus or nuclei network from annotated images or slides"
    )
    tr.add_argument(
        "--task",
        choices=("glomeruli", "nuclei"),
        default="glomeruli",
        help="glomeruli (a class map, default) or nuclei (instances, HoVer heads; --from cellvit:FILE fine-tunes CellViT)",
    )
    tr.add_argument("--annotations", required=True, help="annotation file or folder (GeoJSON, COCO, XML, masks)")
    tr.add_argument("--images", required=True, help="the slide or image, or a folder of them matched by file stem")
    tr.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    tr.add_argument("--arch", choices=ARCHITECTURES, help="network (default unet; with --from, the checkpoint's)")
    tr.add_argument("--encoder", help="smp / timm encoder (default per architecture)")
    tr.add_argument("--decoder-channels", type=int, nargs="+", help="U-Net decoder widths, e.g. 128 64 32 16 8")
    tr.add_argument("--classes", nargs="+", help="class names (default: glomerulus)")
    tr.add_argument("--map", nargs="+", default=[], metavar="LABEL=CLASS", help="rename labels (LABEL=ignore drops)")
    tr.add_argument(
        "--from",
        dest="init",
        help="fine-tune this checkpoint instead of starting fresh (nuclei: also nuclei, cellvit:FILE)",
    )
    tr.add_argument("--freeze-encoder", action="store_true", help="train the decoder only")
    tr.add_argument("--mpp", type=POSITIVE, help="micrometres per pixel of the tiles (default 1.0; nuclei 0.5)")
    tr.add_argument("--image-mpp", type=POSITIVE, help="pixel size of images that do not say (plain PNG/JPEG)")
    tr.add_argument("--tile", type=int, help="tile size at --mpp (default 1024)")
    tr.add_argument("--overlap", type=int, help="overlap between tiles (default 256)")
    tr.add_argument("--input", type=int, help="network input size (default 320)")
    tr.add_argument("--epochs", type=int, help="epochs (default 30; nuclei 36)")
    tr.add_argument("--batch", type=int, help="batch size (default 8; nuclei 16)")
    tr.add_argument("--lr", type=POSITIVE, help="peak learning rate (default 1e-4; nuclei 2e-3)")
    tr.add_argument("--steps", type=int, help="nuclei: steps per epoch (random crops; default 50)")
    tr.add_argument("--crop", type=int, help="nuclei: crop side in px at --mpp (default 192)")
    tr.add_argument("--weight-decay", type=_number(0), help="AdamW weight decay (default 1e-5; nuclei 1e-4)")
    tr.add_argument("--val-fraction", type=OPEN_FRACTION, help="share of images kept for validation (0.2; nuclei 0.15)")
    tr.add_argument("--oversample", nargs="+", default=[], metavar="CLASS=FACTOR", help="draw tiles of a class more")
    tr.add_argument("--allow-empty", action="store_true", help="keep images without objects (as negatives)")
    tr.add_argument("--no-augment", action="store_true", help="train without augmentations")
    tr.add_argument("--loss", choices=("dice", "lovasz"), default="dice", help="BCE + dice (default) or + lovasz")
    tr.add_argument("--stain-jitter", type=_number(0), default=0.3, help="HED stain amounts x 1 +- this (0.3; 0: off)")
    tr.add_argument("--scale-jitter", type=_number(0), default=0.3, help="zoom by up to 1 +- this (default 0.3)")
    tr.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tr.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    tr.add_argument("--half", action="store_true", help="store the weights as float16 (half the size)")
    tr.add_argument("--attribution", help="credit for the training data, kept in the checkpoint's config")
    tr.add_argument("--resume", action="store_true", help="finish an interrupted run (its .training folder)")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint or unfinished run")
    tr.set_defaults(func=cmd_train)

    model = sub.add_parser("model", help="make and inspect model checkpoints")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    init = model_sub.add_parser("init", help="write a checkpoint folder with fresh weights (to try the pipeline)")
    init.add_argument("--arch", required=True, choices=ARCHITECTURES, help="network architecture")
    init.add_argument("--out", required=True, type=Path, help="checkpoint folder to create")
    init.add_argument("--classes", nargs="+", default=["glomerulus"], help="class names (default: glomerulus)")
    init.add_argument("--encoder", help="smp / timm encoder name (default per architecture)")
    init.add_argument("--mpp", type=POSITIVE, default=1.0, help="micrometres per pixel of the tiles (default 1.0)")
    init.add_argument("--tile", type=int, default=1024, help="tile size at --mpp (default 1024)")
    init.add_argument("--overlap", type=int, default=256, help="tile overlap (default 256)")
    init.add_argument("--input", type=int, default=320, help="network input size (default 320)")
    init.add_argument("--seed", type=int, default=0, help="random seed of the fresh weights")
    init.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    init.set_defaults(func=cmd_model_init)

    prompts = sub.add_parser("prompts", help="build, list and edit SegGPT prompt sets (examples cut around objects)")
    prompts_sub = prompts.add_subparsers(dest="prompts_command", required=True, metavar="ACTION")
    add = prompts_sub.add_parser("add", help="cut examples around annotated objects into a prompt set folder")
    add.add_argument("folder", type=Path, help="prompt set folder (created if missing)")
    add.add_argument("annotations", type=Path, help="annotation file or folder: GeoJSON, COCO, XML, label images")
    add.add_argument("--images", required=True, type=Path, help="the annotated slide or image, or a folder of them")
    add.add_argument("--classes", nargs="+", help="class names of a new set (default: the annotations' labels)")
    add.add_argument("--map", nargs="+", default=[], metavar="LABEL=CLASS", help="rename labels (LABEL=ignore drops)")
    add.add_argument("--mpp", type=POSITIVE, help="micrometres per pixel of the crops of a new set (default 1.0)")
    add.add_argument("--size", type=int, help="crop side in pixels of a new set (default 448, SegGPT's input)")
    add.add_argument("--per-class", type=int, help="examples per class, drawn at random (default: every object)")
    add.add_argument("--seed", type=int, default=0, help="random seed of --per-class (default 0)")
    add.add_argument("--image-mpp", type=POSITIVE, help="micrometres per pixel of images that do not say")
    add.set_defaults(func=cmd_prompts_add)
    show = prompts_sub.add_parser("list", help="the examples of a prompt set")
    show.add_argument("folder", type=Path)
    show.set_defaults(func=cmd_prompts_list)
    remove = prompts_sub.add_parser("remove", help="remove examples by id")
    remove.add_argument("folder", type=Path)
    remove.add_argument("ids", nargs="+", help="example ids (see `nephro prompts list`)")
    remove.set_defaults(func=cmd_prompts_remove)
    relabel = prompts_sub.add_parser("relabel", help="give an example's object another class")
    relabel.add_argument("folder", type=Path)
    relabel.add_argument("id", help="example id")
    relabel.add_argument("label", help="its new class (one of the set's)")
    relabel.set_defaults(func=cmd_prompts_relabel)

    demo = sub.add_parser(
        "demo",
        help="the main job offline: the default glomerulus model over a slide (default: the sample, four real "
        "PAS kidney tiles with annotated glomeruli), shown in napari or, with --headless, written to files",
    )
    demo.add_argument("slide", nargs="?", help="slide to segment instead of the sample")
    demo.add_argument("--slide", dest="slide_option", help="the same, as an option")
    demo.add_argument("--headless", action="store_true", help="no window: write labels, GeoJSON and a PNG overview")
    demo.add_argument("--out", type=Path, default=Path("nephro-demo"), help="folder for the files (nephro-demo)")
    demo.add_argument("--model", default="default", help="checkpoint folder, or 'default' (the shipped model)")
    demo.add_argument("--nuclei-model", default="nuclei", help="nuclei model (default: nuclei, the shipped one)")
    demo.add_argument("--no-nuclei", action="store_true", help="glomeruli only")
    demo.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    demo.add_argument("--mpp", type=POSITIVE, help="level-0 micrometres per pixel, for slides that do not say")
    demo.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo in --out")
    demo.add_argument("--screenshot", type=Path, metavar="PNG", help="save a screenshot of the window and exit")
    demo.set_defaults(func=cmd_demo)

    from .cli_review import add_parser as add_review

    add_review(sub, POSITIVE, FRACTION)
    from .cli_batch import add_parser as add_batch

    add_batch(sub, POSITIVE)
    return parser


def _shape(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHT,WIDTH, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return h, w


def _region(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"expected X,Y,W,H in level-0 pixels, got {text!r}")
    x, y, w, h = (_finite(v) for v in parts)
    return x, y, w, h


NUCLEI_OPTIONS = ("diameter", "flow_threshold", "cellprob_threshold", "prob_threshold", "nms_threshold")


def cmd_segment(args: argparse.Namespace) -> int:
    from .inference import partial_path, segment_slide

    if (args.batch is not None and args.batch < 1) or (args.readers is not None and args.readers < 1):
        raise UserError("--batch and --readers must be at least 1")
    from .models.nuclei import family_of

    if family_of(args.model) is not None:
        return _segment_nuclei(args)
    given = [f"--{k.replace('_', '-')}" for k in NUCLEI_OPTIONS if getattr(args, k) is not None]
    if given:
        raise UserError(
            f"{', '.join(given)}: options of the nuclei models (cellpose, stardist, nuclei), not of {args.model}"
        )
    from .inference.output import check_output

    if check_output(args.out, overwrite=args.overwrite, resume=args.resume):  # before a model of seconds to load
        print(f"{args.out}: the run is already complete; nothing to resume")
        return 0
    slide = open_slide(args.slide, mpp=args.mpp)
    from .inference.plan import check_region, slide_mpp

    slide_mpp(slide)  # what can be refused without the model is refused before its seconds of loading
    check_region(slide, args.region)
    segmenter = _segmenter(args)
    _announce_cost(slide, segmenter, args)
    try:
        with _progress_bar("segment", "tile") as bar:
            result = segment_slide(
                slide,
                segmenter,
                args.out,
                region=args.region,
                out_downsample=args.out_scale,
                threshold=args.threshold,
                tile=args.tile,
                overlap=args.overlap,
                batch_size=getattr(segmenter, "tiles_per_call", None) or args.batch or 4,
                readers=args.readers,
                skip_background=not args.all_tiles,
                objects=None if args.no_objects else "model",
                resume=args.resume,
                overwrite=args.overwrite,
                progress=lambda p: bar(p.done, p.total),
            )
    except KeyboardInterrupt:
        partial = partial_path(args.out)
        if partial.exists():
            print(
                f"nephro: interrupted; the rows finished are kept in {partial}: add --resume to finish", file=sys.stderr
            )
        else:
            print("nephro: interrupted", file=sys.stderr)
        return 130
    print(_result_line(result, segmenter))
    if result.summary is not None:
        print(result.summary.describe(), flush=True)
        warning = result.summary.warning()
        if warning:
            print(f"nephro: warning: {warning}", file=sys.stderr)
    return 0


def _segment_nuclei(args: argparse.Namespace) -> int:
    """`nephro segment SLIDE --model cellpose|stardist|cellvit...`: nuclei into labels, detections or a table."""
    from .inference import partial_path
    from .inference.instance_api import segment_instances_slide
    from .inference.instance_output import INSTANCE_SUFFIXES
    from .inference.output import check_output
    from .models.nuclei import load_nuclei_model

    for flag, used in (("--prompts", args.prompts is not None), ("--no-objects", args.no_objects)):
        if used:
            raise UserError(f"{flag} is not an option of the nuclei models")
    if args.threshold != 0.5:
        raise UserError(
            "--threshold is for glomerulus models: cellpose takes --cellprob-threshold, stardist and nuclei --prob-threshold"
        )
    if check_output(args.out, overwrite=args.overwrite, resume=args.resume, allowed=INSTANCE_SUFFIXES):
        print(f"{args.out}: the run is already complete; nothing to resume")
        return 0
    slide = open_slide(args.slide, mpp=args.mpp)
    from .inference.plan import check_region, slide_mpp

    slide_mpp(slide)
    check_region(slide, args.region)
    options = {k: getattr(args, k) for k in NUCLEI_OPTIONS}
    with warnings.catch_warnings():  # a model's licence note is printed below as one line, not as a warning
        warnings.simplefilter("ignore", UserWarning)
        segmenter = load_nuclei_model(args.model, device=args.device, **options)
    for line in nuclei_cost(slide, segmenter, args.region, args.tile, args.overlap, not args.all_tiles):
        print(f"nephro: {line}", file=sys.stderr)
    try:
        with _progress_bar("nuclei", "tile") as bar:
            result = segment_instances_slide(
                slide,
                segmenter,
                args.out,
                region=args.region,
                out_downsample=args.out_scale,
                tile=args.tile,
                overlap=args.overlap,
                batch_size=args.batch or getattr(segmenter, "tiles_per_call", None) or 4,
                readers=args.readers,
                skip_background=not args.all_tiles,
                resume=args.resume,
                overwrite=args.overwrite,
                progress=lambda p: bar(p.done, p.total),
            )
    except KeyboardInterrupt:
        partial = partial_path(args.out)
        where = f"; the rows finished are kept in {partial}: add --resume to finish" if partial.exists() else ""
        print(f"nephro: interrupted{where}", file=sys.stderr)
        return 130
    finally:
        close = getattr(segmenter, "close", None)
        if close is not None:
            close()
    print(_result_line(result, segmenter))
    if result.summary is not None:
        print(result.summary.line(), flush=True)
    return 0


def _result_line(result, segmenter) -> str:
    """'out.zarr at 1.002 um/px  (12 tiles, 3 glass skipped, 9 predicted in 4.1 s on cpu)'."""
    stats = result.stats
    scale = f" at {result.mpp:.4g} um/px" if result.mpp else ""
    return (
        f"{result.path}{scale}  ({stats.tiles} tiles, {stats.skipped} glass skipped, {stats.predicted} predicted "
        f"in {stats.seconds:.1f} s on {segmenter.device})"
    )


def nuclei_cost(slide, segmenter, region, tile, overlap, skip_background) -> list[str]:
    """What the user must know before a nuclei run: the weights' terms, and the time it takes on a CPU."""
    from .inference import plan_run
    from .inference.instance_api import cpu_cost

    lines = [f"note: {segmenter.licence}"] if getattr(segmenter, "licence", None) else []
    if getattr(segmenter, "cpu_seconds_per_megapixel", None):  # planning reads the tissue map: only when it tells
        plan = plan_run(slide, segmenter, region, tile=tile, overlap=overlap, skip_background=skip_background)
        cost = cpu_cost(plan, segmenter, advice="use --device cuda, or segment a --region")
        if cost is not None:
            lines.append(cost[1])
    return lines


def _segmenter(args: argparse.Namespace):
    """Our checkpoint, or SegGPT with a prompt set (`--model seggpt[:PATH]`)."""
    name, _, source = str(args.model).partition(":")
    if name != "seggpt":
        if args.prompts is not None:
            raise UserError("--prompts is for SegGPT: use --model seggpt[:FOLDER] with it")
        from .models import TorchSegmenter

        return TorchSegmenter.from_checkpoint(args.model, device=args.device)
    if args.prompts is None:
        raise UserError("SegGPT segments like the examples it is shown: give --prompts PROMPT_SET_FOLDER")
    if args.tile is not None:
        raise UserError(
            "SegGPT tiles have the size of the prompt crops: drop --tile (or cut the prompts at another size)"
        )
    from .models.seggpt import SegGptSegmenter
    from .prompts import PromptSet

    prompts = PromptSet.load(args.prompts)
    prompts.check_usable()
    return SegGptSegmenter.load(
        source or None, prompts, device=args.device, mode=args.seggpt_mode, pairs_per_batch=args.batch
    )


def _announce_cost(slide, segmenter, args: argparse.Namespace) -> None:
    """Before a SegGPT run: tiles x prompts and the time that takes here, and what to do if it is long."""
    if not hasattr(segmenter, "seconds_per_tile"):  # only SegGPT can tell its cost
        return
    from .inference import plan_run
    from .models.seggpt import LONG_RUN_SECONDS, run_cost

    for name in segmenter.missing_classes():
        print(f"nephro: note: class {name!r} has no example in the prompt set: it will not be found", file=sys.stderr)
    if slide.mpp is not None and slide.mpp > 1.5 * segmenter.mpp:
        print(
            f"nephro: note: the slide ({slide.mpp:g} um/px) is coarser than the prompts ({segmenter.mpp:g} um/px): "
            "its tiles are enlarged to the prompts' scale and look blurrier than the examples",
            file=sys.stderr,
        )
    plan = plan_run(slide, segmenter, args.region, overlap=args.overlap, skip_background=not args.all_tiles)
    device = segmenter.device.type
    seconds, text = run_cost(plan.tissue_tiles, segmenter.prompt_count, device, segmenter.parameters)
    if device == "cpu" and seconds > LONG_RUN_SECONDS:
        text += "; on a CPU, segment a --region (a few glomeruli) or use a GPU (--device cuda)"
    print(f"nephro: SegGPT: {text}", file=sys.stderr)


def cmd_prompts_add(args: argparse.Namespace) -> int:
    from .pipelines.prompts import add_from_files

    result = add_from_files(
        args.folder,
        args.annotations,
        args.images,
        classes=args.classes,
        class_map=_pairs(args.map, "--map"),
        mpp=args.mpp,
        size=args.size,
        per_class=args.per_class,
        seed=args.seed,
        image_mpp=args.image_mpp,
    )
    for note in result.skipped:
        _note(note)
    print(f"{result.folder}: {len(result.added)} examples added; {result.prompts.describe()}")
    return 0


def cmd_prompts_list(args: argparse.Namespace) -> int:
    from .prompts import PromptSet

    prompts = PromptSet.load(args.folder)
    print(f"{args.folder}: {prompts.describe()}")
    for e in prompts.examples:
        x, y, w, h = e.location
        print(f"{e.id}  {e.label:<22} {e.source}  at x={x:.0f} y={y:.0f} ({w:.0f} x {h:.0f} px)")
    return 0


def cmd_prompts_remove(args: argparse.Namespace) -> int:
    from .prompts import PromptSet

    prompts = PromptSet.load(args.folder)
    prompts.remove(*args.ids)
    prompts.save(args.folder, overwrite=True)
    print(f"{args.folder}: removed {', '.join(args.ids)}; {prompts.describe()}")
    return 0


def cmd_prompts_relabel(args: argparse.Namespace) -> int:
    from .prompts import PromptSet

    prompts = PromptSet.load(args.folder)
    prompts.relabel(args.id, args.label)
    prompts.save(args.folder, overwrite=True)
    print(f"{args.folder}: {args.id} is now {args.label}; {prompts.describe()}")
    return 0


def _pairs(values: list[str], option: str, number: bool = False) -> dict:
    pairs = {}
    for text in values:
        key, sep, value = text.partition("=")
        if not sep or not key or not value:
            raise UserError(f"{option} takes NAME=VALUE pairs, not {text!r}")
        try:
            pairs[key] = _finite(value) if number else value
        except argparse.ArgumentTypeError:
            raise UserError(f"{option} {text!r}: {value!r} is not a finite number") from None
    return pairs


GLOMERULI_ONLY = ("arch", "classes", "map", "tile", "overlap", "input", "oversample", "allow_empty", "loss", "half")


def cmd_train(args: argparse.Namespace) -> int:
    from .pipelines.train import train_from_files
    from .training import Recipe

    if args.task == "nuclei":
        return _train_nuclei(args)
    for name in ("steps", "crop"):
        if getattr(args, name) is not None:
            raise UserError(f"--{name} is an option of --task nuclei")
    recipe = Recipe(
        epochs=30 if args.epochs is None else args.epochs,
        batch_size=8 if args.batch is None else args.batch,
        lr=1e-4 if args.lr is None else args.lr,
        weight_decay=1e-5 if args.weight_decay is None else args.weight_decay,
        seed=args.seed,
        val_fraction=0.2 if args.val_fraction is None else args.val_fraction,
        freeze_encoder=args.freeze_encoder,
        augment=not args.no_augment,
        loss=args.loss,
        stain_jitter=args.stain_jitter,
        scale_jitter=args.scale_jitter,
    )
    bars: dict = {}

    def on_step(step) -> None:
        if "bar" not in bars:
            from tqdm import tqdm

            bars["bar"] = tqdm(
                total=step.steps, desc=f"epoch {step.epoch}", unit="batch", file=sys.stderr, leave=False, disable=None
            )  # disable=None: no bar when stderr is a file or a pipe (one line per epoch says enough)
        bars["bar"].set_postfix(loss=f"{step.loss:.3f}")
        bars["bar"].update(1)

    def on_epoch(epoch) -> None:
        if "bar" in bars:
            bars.pop("bar").close()
        print(
            f"epoch {epoch.epoch:3d}  train loss {epoch.train_loss:.4f}  val loss {epoch.val_loss:.4f}  "
            f"val Dice {epoch.val_dice:.4f}  ({epoch.seconds:.0f} s)",
            file=sys.stderr,
        )

    try:
        with _progress_bar("cut tiles", "tile") as cut:
            result = train_from_files(
                args.annotations,
                args.images,
                args.out,
                arch=args.arch,
                encoder=args.encoder,
                decoder_channels=args.decoder_channels,
                classes=args.classes,
                class_map=_pairs(args.map, "--map"),
                init=Path(args.init) if args.init else None,
                mpp=args.mpp,
                image_mpp=args.image_mpp,
                tile=args.tile,
                overlap=args.overlap,
                input_size=args.input,
                recipe=recipe,
                oversample=_pairs(args.oversample, "--oversample", number=True),
                allow_empty=args.allow_empty,
                device=args.device,
                half=args.half,
                attribution=args.attribution,
                resume=args.resume,
                overwrite=args.overwrite,
                on_cut=cut,
                on_step=on_step,
                on_epoch=on_epoch,
            )
    except KeyboardInterrupt:
        if resumable(args.out):
            print("nephro: interrupted; the finished epochs are kept: add --resume to finish", file=sys.stderr)
        else:
            print("nephro: interrupted before the first epoch ended; nothing was kept", file=sys.stderr)
        return 130
    finally:
        if "bar" in bars:
            bars.pop("bar").close()
    if result.path is None:
        print(f"nephro: stopped after epoch {len(result.history)}; add --resume to finish", file=sys.stderr)
        return 130
    print(f"{result.path}  (best epoch {result.best_epoch}, validation Dice {result.best_dice:.3f})")
    return 0


def _train_nuclei(args: argparse.Namespace) -> int:
    """`nephro train --task nuclei`: a HoVer U-Net from instance annotations, or a fine-tune of ours or CellViT."""
    from .pipelines.train_nuclei import train_nuclei_from_files
    from .training.nuclei_loop import NucleiRecipe

    defaults = {"map": [], "oversample": [], "allow_empty": False, "loss": "dice", "half": False}
    wrong = [f"--{k.replace('_', '-')}" for k in GLOMERULI_ONLY if getattr(args, k) not in (None, defaults.get(k))]
    if wrong:
        raise UserError(f"{', '.join(wrong)}: options of glomerulus training, not of --task nuclei")
    base = NucleiRecipe()
    recipe = NucleiRecipe(
        epochs=base.epochs if args.epochs is None else args.epochs,
        steps_per_epoch=base.steps_per_epoch if args.steps is None else args.steps,
        batch_size=base.batch_size if args.batch is None else args.batch,
        crop=base.crop if args.crop is None else args.crop,
        lr=base.lr if args.lr is None else args.lr,
        weight_decay=base.weight_decay if args.weight_decay is None else args.weight_decay,
        seed=args.seed,
        val_fraction=base.val_fraction if args.val_fraction is None else args.val_fraction,
        freeze_encoder=args.freeze_encoder,
        augment=not args.no_augment,
        stain_jitter=args.stain_jitter,
        scale_jitter=args.scale_jitter,
    )

    def on_epoch(epoch) -> None:
        print(
            f"epoch {epoch.epoch:3d}  train loss {epoch.train_loss:.4f}  val loss {epoch.val_loss:.4f}  "
            f"val F1 {epoch.val_f1:.4f}  AJI {epoch.val_aji:.4f}  ({epoch.seconds:.0f} s)",
            file=sys.stderr,
        )

    try:
        with _progress_bar("read images", "image") as read, _progress_bar("train", "batch") as step:
            result = train_nuclei_from_files(
                args.annotations,
                args.images,
                args.out,
                init=args.init,
                mpp=args.mpp,
                image_mpp=args.image_mpp,
                encoder=args.encoder,
                decoder_channels=args.decoder_channels,
                recipe=recipe,
                device=args.device,
                attribution=args.attribution,
                resume=args.resume,
                overwrite=args.overwrite,
                on_read=read,
                on_step=lambda s: step(s.step, s.steps),
                on_epoch=on_epoch,
            )
    except KeyboardInterrupt:
        kept = resumable(args.out)
        print(
            f"nephro: interrupted; {'add --resume to finish' if kept else 'no epoch finished, nothing kept'}",
            file=sys.stderr,
        )
        return 130
    if result.path is None:
        print(f"nephro: stopped after epoch {len(result.history)}; add --resume to finish", file=sys.stderr)
        return 130
    print(f"{result.path}  (best epoch {result.best_epoch}, validation instance F1 {result.best_f1:.3f})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .pipelines import evaluate

    shape = args.shape
    if shape is None and args.slide:
        with open_slide(args.slide) as slide:
            shape = slide.level_shapes[0]
    report = evaluate(args.pred, args.truth, iou_threshold=args.iou, crops=args.per_crop, shape=shape, on_note=_note)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_evaluation(report))
    return 0


def cmd_model_init(args: argparse.Namespace) -> int:
    import torch

    from .models import ModelConfig, build_network, save_checkpoint

    config = ModelConfig(
        arch=args.arch,
        classes=args.classes,
        encoder=args.encoder,
        mpp=args.mpp,
        tile_size=args.tile,
        overlap=args.overlap,
        input_size=args.input,
        provenance={
            "made_by": f"nephro model init (napari-nephro {__version__})",
            "weights": f"random, seed {args.seed}",
        },
    )
    torch.manual_seed(args.seed)
    network = build_network(config)
    print(save_checkpoint(network, config, args.out, overwrite=args.overwrite))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .pipelines import export

    with _progress_bar("export", "tile") as progress:
        written = export(
            args.input,
            args.to,
            args.out,
            slide=args.slide,
            overwrite=args.overwrite,
            tile=args.tile,
            overlap=args.overlap,
            mpp=args.mpp,
            keep=args.keep,
            values=args.values,
            progress=progress,
            on_note=_note,
            image_mpp=args.image_mpp,
        )
    for path in written:
        print(path)
    return 0


def _note(message: str) -> None:
    """Something the user should know that is not an error: a feature skipped, an object left out."""
    print(f"nephro: note: {message}", file=sys.stderr)


@contextlib.contextmanager
def _progress_bar(description: str, unit: str):
    """A tqdm bar on stderr fed by a (done, total) callback, the engine's progress protocol."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr, leave=False, disable=None)
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def format_evaluation(report: dict) -> str:
    """Per-image rows, then mean ± sd as the papers' tables report them."""
    cols = ("dice", "precision", "recall", "f1", "mean_matched_iou", "panoptic_quality")
    heads = ("Dice", "precision", "recall", "F1", "mIoU", "PQ")
    rows = [
        f"{'image':<28} {'true':>5} {'pred':>5} {'TP':>5} {'FP':>5} {'FN':>5} " + " ".join(f"{h:>9}" for h in heads)
    ]
    for r in report["images"]:
        cells = " ".join(f"{_fmt(r[c]):>9}" for c in cols)
        rows.append(
            f"{r['image'][:28]:<28} {r['n_true']:>5} {r['n_pred']:>5} {r['tp']:>5} {r['fp']:>5} {r['fn']:>5} {cells}"
        )
        for name, s in r.get("per_class", {}).items():
            rows.append(f"  {name[:26]:<26} Dice {_fmt(s['dice'])}")
        if "crop_dice_mean" in r:
            rows.append(f"  {'per-crop Dice (mean)':<26} {_fmt(r['crop_dice_mean'])}")
    summary = report["summary"]
    parts = [f"{h} {_fmt(summary[c]['mean'])} ± {_fmt(summary[c]['std'])}" for c, h in zip(cols, heads, strict=True)]
    rows.append(f"mean ± sd over {len(report['images'])} images: " + ", ".join(parts))
    rows.append(f"(IoU threshold {report['iou_threshold']}; '-' = undefined: nothing to divide by)")
    return "\n".join(rows)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cmd_info(args: argparse.Namespace) -> int:
    with open_slide(args.slide, mpp=args.mpp) as slide:
        info = slide.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(format_info(info))
    return 0


def format_info(info: dict) -> str:
    """The `nephro info` table: what a pathologist checks before analysing a slide."""
    mpp = "unknown (give --mpp)" if info["mpp"] is None else f"{info['mpp']:.4f} um/px ({info['mpp_source']})"
    power = info["objective_power"]
    lines = [
        f"slide       {info['path']}",
        f"backend     {info['backend']}",
        f"vendor      {info['vendor'] or 'unknown'}",
        f"mpp         {mpp}",
        f"objective   {f'{power:g}x' if power else 'unknown'}",
        f"associated  {', '.join(info['associated_images']) or 'none'}",
        "",
        f"{'level':>5} {'width':>8} {'height':>8} {'downsample':>10} {'tile':>9} {'mpp':>9}",
    ]
    for lv in info["levels"]:
        mpp_level = "-" if lv["mpp_x"] is None else f"{(lv['mpp_x'] + lv['mpp_y']) / 2:.4f}"
        tile = f"{lv['tile_width']}x{lv['tile_height']}"
        lines.append(
            f"{lv['level']:>5} {lv['width']:>8} {lv['height']:>8} {lv['downsample']:>10.4g} {tile:>9} {mpp_level:>9}"
        )
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from .annotations import read_annotations
    from .pipelines.demo import run_demo_job
    from .sample import sample_annotations_path, sample_slide_path

    if args.slide and args.slide_option:
        raise UserError("give the slide once: as an argument or with --slide")
    if not args.headless and not _has_display():
        print(
            "nephro: error: no display to open napari on: add --headless to write the results to files, or run "
            'xvfb-run -a -s "-screen 0 1600x1000x24" nephro demo --screenshot demo.png',
            file=sys.stderr,
        )
        return EXIT_USAGE
    given = args.slide or args.slide_option
    path = Path(given) if given else sample_slide_path()
    slide = open_slide(path, mpp=args.mpp)  # fail here, with one line, before any work
    truth_path = None if given else sample_annotations_path()  # the sample's glomeruli are annotated
    truth = None if truth_path is None else read_annotations(truth_path)
    with _progress_bar("segment", "tile") as bar, _progress_bar("nuclei", "tile") as nuclei_bar:
        job = run_demo_job(
            slide,
            args.out,
            model=args.model,
            device=args.device,
            progress=lambda p: bar(p.done, p.total),
            overwrite=args.overwrite,
            truth=truth,
            nuclei_model=None if args.no_nuclei else args.nuclei_model,
            nuclei_progress=lambda p: nuclei_bar(p.done, p.total),
        )
    print(f"{job.summary}, in {slide.source.name} in {job.seconds:.0f} s")
    if job.nuclei_summary is not None:
        print(f"{job.nuclei_summary}, in {job.nuclei_seconds:.0f} s")
    if job.warning:
        print(f"nephro: warning: {job.warning}", file=sys.stderr)
    if job.match is not None:
        print(job.describe_match())
    for what, file in (("labels", job.labels), ("polygons", job.geojson), ("overview", job.overview)):
        print(f"{what:<9} {file}")
    if job.nuclei is not None:
        print(f"{'nuclei':<9} {job.nuclei}" + (f"  (nuclei model {job.nuclei_terms})" if job.nuclei_terms else ""))
    if truth_path is not None:
        print(f"{'annotated':<9} {truth_path}")
    if args.headless:
        return 0
    from .plugin.demo import run_demo

    return run_demo(slide, job.labels, screenshot=args.screenshot, annotations=truth_path, nuclei=job.nuclei)


def _has_display() -> bool:
    """Qt aborts the whole process without a display on Linux; say so in one line instead."""
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


if __name__ == "__main__":
    sys.exit(main())
