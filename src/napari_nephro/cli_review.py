"""`nephro review ...`: a review project from the shell (new, predict, status, fuse, export, finetune).

Rating and correcting happen in napari (the Review widget); everything before and
after them is here too, so a lab can script its rounds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub, positive, fraction) -> None:
    """The `review` command and its actions, on the main parser's subparsers."""
    review = sub.add_parser("review", help="human in the loop: sample patches, run models, fuse ratings, fine-tune")
    actions = review.add_subparsers(dest="review_command", required=True, metavar="ACTION")

    new = actions.add_parser("new", help="sample patches in tissue and run every model on them")
    new.add_argument("project", type=Path, help="project folder to create")
    new.add_argument("--slides", nargs="+", required=True, help="slides or images to sample from")
    new.add_argument("--models", nargs="+", required=True, help="models as SPEC or NAME=SPEC (as --model takes them)")
    new.add_argument("--patches", type=int, default=200, help="number of patches (default 200)")
    new.add_argument("--size", type=int, default=512, help="patch side in px at --mpp (default 512)")
    new.add_argument("--mpp", type=positive, help="patch pixel size (default: the first model's working scale)")
    new.add_argument("--image-mpp", type=positive, help="pixel size of images that state none (PNG, JPEG)")
    new.add_argument(
        "--sampling", choices=("random", "stratified"), default="random", help="stratified: as many per slide"
    )
    new.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    new.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps")
    new.add_argument("--overwrite", action="store_true", help="replace an existing project folder")
    new.set_defaults(func=cmd_new)

    predict = actions.add_parser("predict", help="finish the predictions of a project (resume), or add a model")
    predict.add_argument("project", type=Path)
    predict.add_argument("--add", metavar="SPEC", help="add this model (e.g. a fine-tuned checkpoint) and run it")
    predict.add_argument("--name", help="name of the added model (default from its spec)")
    predict.add_argument("--device", default="auto")
    predict.set_defaults(func=cmd_predict)

    status = actions.add_parser("status", help="patches, predictions and ratings of a project")
    status.add_argument("project", type=Path)
    status.add_argument("--json", action="store_true", help="print JSON instead of lines")
    status.set_defaults(func=cmd_status)

    fuse = actions.add_parser("fuse", help="fused ratings and agreement: tables and figures in PROJECT/results")
    fuse.add_argument("project", type=Path)
    fuse.set_defaults(func=cmd_fuse)

    export = actions.add_parser("export", help="easy and hard pairs as a training set with oversampling weights")
    export.add_argument("project", type=Path)
    export.add_argument("--to", choices=("tiles",), default="tiles", help="what to write (a tile dataset)")
    export.add_argument("--out", type=Path, required=True, help="folder to write")
    export.add_argument("--sets", nargs="+", choices=("easy", "hard"), default=["easy", "hard"])
    export.add_argument("--gamma", type=fraction, default=0.85, help="oversampling strength in [0, 1] (0.85)")
    export.add_argument(
        "--rule",
        choices=("agreement", "order"),
        default="agreement",
        help="which good prediction becomes a patch's easy pair when several are good",
    )
    export.add_argument("--order", nargs="+", help="model preference for --rule order")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=cmd_export)

    tune = actions.add_parser("finetune", help="fine-tune a model on an exported easy + hard set")
    tune.add_argument("dataset", type=Path, help="folder written by nephro review export")
    tune.add_argument("--model", required=True, help="the model to fine-tune, as --model takes it")
    tune.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    tune.add_argument("--sets", nargs="+", choices=("easy", "hard"), default=["easy", "hard"])
    tune.add_argument("--epochs", type=int, help="default per family")
    tune.add_argument("--steps", type=int, help="steps per epoch (default per family)")
    tune.add_argument("--batch", type=int, help="batch size (default per family)")
    tune.add_argument("--crop", type=int, help="training crop side in px (default per family)")
    tune.add_argument("--lr", type=positive, help="learning rate (default per family)")
    tune.add_argument("--freeze-encoder", action="store_true", help="train the decoder only")
    tune.add_argument("--device", default="auto")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    tune.set_defaults(func=cmd_finetune)


def _bar(description: str, unit: str):
    from .cli import _progress_bar

    return _progress_bar(description, unit)


def cmd_new(args: argparse.Namespace) -> int:
    from .pipelines.review import new_project

    with _bar("review", "prediction") as bar:
        root = new_project(
            args.project,
            args.slides,
            args.models,
            patches=args.patches,
            size=args.size,
            mpp=args.mpp,
            slide_mpp=args.image_mpp,
            seed=args.seed,
            sampling=args.sampling,
            device=args.device,
            overwrite=args.overwrite,
            progress=lambda done, total, text="": bar(done, total),
        )
    _print_status(root)
    print(f"rate the patches in napari: Plugins > napari-nephro > Review, project {root}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .pipelines.review import add_model, predict_project

    with _bar("review", "prediction") as bar:
        progress = lambda done, total, text="": bar(done, total)  # noqa: E731
        if args.add:
            add_model(args.project, args.add, args.name, device=args.device, progress=progress)
        else:
            predict_project(args.project, device=args.device, progress=progress)
    _print_status(args.project)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .pipelines.review import project_status

    if args.json:
        print(json.dumps(project_status(args.project), indent=2, default=str))
        return 0
    _print_status(args.project)
    return 0


def _print_status(root) -> None:
    from .pipelines.review import project_status

    status = project_status(root)
    for key, value in status.items():
        print(f"{key}: {value}")


def cmd_fuse(args: argparse.Namespace) -> int:
    from .review.figures import write_results
    from .review.fusion import fusion_report

    report = fusion_report(args.project)
    paths = write_results(args.project, report)
    print(report.summary())
    for path in paths:
        print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .review.export import export_tiles

    out = export_tiles(
        args.project,
        args.out,
        sets=tuple(args.sets),
        gamma=args.gamma,
        rule=args.rule,
        order=args.order,
        overwrite=args.overwrite,
        on_note=print,
    )
    meta = json.loads((Path(out) / "dataset.json").read_text())
    sets = meta.get("review", {}).get("sets", {})
    print(f"{out}: {meta.get('tiles')} pairs ({', '.join(f'{k} {v}' for k, v in sets.items())})")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .review.finetune import finetune

    given = {
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "batch_size": args.batch,
        "crop": args.crop,
        "lr": args.lr,
    }
    with _bar("fine-tune", "step") as bar:
        out = finetune(
            args.dataset,
            args.model,
            args.out,
            sets=tuple(args.sets),
            freeze_encoder=args.freeze_encoder,
            device=args.device,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=lambda done, total, *rest: bar(done, total),
            **{k: v for k, v in given.items() if v is not None},
        )
    print(f"{out}: fine-tuned; run it on the project's patches with nephro review predict PROJECT --add {out}")
    return 0
