"""`nephro`: the plugin's operations from a shell.

User mistakes (a missing file, a file that is not a slide) end in one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .io import SlideError, open_slide

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SlideError as exc:
        print(f"nephro: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nephro: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nephro", description="Kidney pathology on whole-slide images.")
    parser.add_argument("--version", action="version", version=f"napari-nephro {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="describe a slide: format, levels, pixel size, tiles, associated images")
    info.add_argument("slide", help="slide file, DICOM WSI folder, or plain image")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--mpp", type=float, help="level-0 micrometres per pixel, for files that do not say")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser(
        "demo", help="open napari with a slide (default: the synthetic sample) and the plugin's widgets"
    )
    demo.add_argument("slide", nargs="?", help="slide to open instead of the synthetic sample")
    demo.add_argument("--screenshot", type=Path, metavar="PNG", help="save a screenshot of the window and exit")
    demo.set_defaults(func=cmd_demo)
    return parser


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
    from .sample import sample_slide_path

    if not _has_display():
        print(
            "nephro: error: no display to open napari on: run it on a desktop, or headless as "
            'xvfb-run -a -s "-screen 0 1600x1000x24" nephro demo --screenshot demo.png',
            file=sys.stderr,
        )
        return EXIT_USAGE
    path = Path(args.slide) if args.slide else sample_slide_path()
    slide = open_slide(path)  # fail here, with one line, before a window opens
    from .demo import run_demo

    return run_demo(slide, screenshot=args.screenshot)


def _has_display() -> bool:
    """Qt aborts the whole process without a display on Linux; say so in one line instead."""
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


if __name__ == "__main__":
    sys.exit(main())
