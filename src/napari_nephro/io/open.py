"""`open_slide`: pick the reader for a path and turn every failure into one `SlideError` line."""

from __future__ import annotations

import os
from pathlib import Path

from ..common.paths import path_problem
from .backend import Backend
from .cache import DEFAULT_CACHE_BYTES
from .errors import SlideError
from .slide import Slide
from .tiff_check import verify_tiff

# Extensions each backend claims; the napari reader uses them to decide cheaply.
OPENSLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".dcm", ".svslide")
TIFF_EXTENSIONS = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf2", ".tf8", ".qptiff")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
SLIDE_EXTENSIONS = OPENSLIDE_EXTENSIONS + TIFF_EXTENSIONS + IMAGE_EXTENSIONS
BACKENDS = ("openslide", "tifffile", "image")


def open_slide(
    path: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    backend: str | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Slide:
    """Open a whole-slide image, a DICOM WSI folder or a plain image, lazily.

    `mpp` sets the level-0 pixel size in micrometres when the file lacks it (or is
    wrong); `backend` forces "openslide", "tifffile" or "image". Raises SlideError
    with a one-line reason for anything that is not a readable brightfield slide.
    """
    path = Path(path).expanduser()
    if backend is not None and backend not in BACKENDS:
        raise SlideError(path, f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    source = path
    try:
        path = _resolve(path)
        opened = _open_backend(path, backend)
    except OSError as exc:  # permissions, a file removed meanwhile, a broken network share
        raise SlideError(path, exc.strerror or str(exc)) from None
    try:
        return Slide(path, opened, mpp=mpp, cache_bytes=cache_bytes, source=source)
    except BaseException:
        opened.close()
        raise


def _resolve(path: Path) -> Path:
    """The file to open: the path itself, or the slide inside a DICOM or MIRAX folder."""
    problem = path_problem(path)
    if problem:
        raise SlideError(path, problem)
    if path.is_dir():
        return _slide_in_directory(path)
    if path.stat().st_size == 0:
        raise SlideError(path, "the file is empty (0 bytes)")
    return path


def _slide_in_directory(folder: Path) -> Path:
    from .openslide_backend import detect_vendor

    files = sorted(p for p in folder.iterdir() if p.is_file())
    for suffix in (".mrxs", ".vms"):
        found = [p for p in files if p.suffix.lower() == suffix]
        if len(found) == 1:
            return found[0]
    dicoms = [p for p in files if _may_be_dicom(p)]
    # Any file of a DICOM WSI series opens the whole series; prefer the largest (the volume).
    for candidate in sorted(dicoms, key=lambda p: -p.stat().st_size):
        if detect_vendor(candidate) == "dicom":
            return candidate
    if dicoms:
        raise SlideError(folder, f"has {len(dicoms)} DICOM files but none is a whole-slide image OpenSlide can read")
    raise SlideError(folder, "directory contains no slide (looked for a DICOM WSI series, .mrxs or .vms)")


def _may_be_dicom(path: Path) -> bool:
    """A .dcm file, or an extensionless one with the DICOM preamble (as many PACS exports are named)."""
    if path.suffix.lower() == ".dcm":
        return True
    if path.suffix:
        return False
    with open(path, "rb") as fh:
        head = fh.read(132)
    return head[128:132] == b"DICM"


def _open_backend(path: Path, backend: str | None) -> Backend:
    from .image_backend import ImageBackend
    from .openslide_backend import VENDOR_FORMATS, OpenSlideBackend, detect_vendor
    from .tifffile_backend import TiffBackend

    if backend == "image":
        return ImageBackend(path)
    is_tiff = _is_tiff(path)
    if backend == "openslide" or (backend is None and detect_vendor(path) in VENDOR_FORMATS):
        if is_tiff:
            verify_tiff(path)  # OpenSlide would open a truncated SVS and fail tile by tile later
        return OpenSlideBackend(path, check_tiles=not is_tiff)
    if backend == "tifffile" or is_tiff:
        return TiffBackend(path)  # checks completeness itself
    if path.suffix.lower() in OPENSLIDE_EXTENSIONS:
        raise SlideError(path, f"not a valid {path.suffix} slide: OpenSlide does not recognise its contents")
    return ImageBackend(path)


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def can_open(path: str | os.PathLike[str]) -> bool:
    """A cheap guess, without decoding, whether `open_slide` is the right reader."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():  # the same test `_slide_in_directory` applies, so napari and the CLI agree
        try:
            return any(f.is_file() and (f.suffix.lower() in (".mrxs", ".vms") or _may_be_dicom(f)) for f in p.iterdir())
        except OSError:
            return False
    return name.endswith(SLIDE_EXTENSIONS)
