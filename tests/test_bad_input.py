"""Every user mistake about a slide: one line naming the file and the reason, exit 2, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import require_shared
from napari_nephro import SlideError, open_slide
from napari_nephro.cli import main


def _truncated_svs(tmp_path, fraction):
    src = require_shared("wsi", "CMU-1-Small-Region.svs").read_bytes()
    path = tmp_path / f"cut-{fraction}.svs"
    path.write_bytes(src[: int(len(src) * fraction)])
    return path


def _label_only_dicom(tmp_path):
    """One file of a DICOM WSI series without its volume: real DICOM that OpenSlide refuses."""
    series = require_shared("wsi", "CMU-1-Small-Region-dicom")
    smallest = min(series.glob("*.dcm"), key=lambda p: p.stat().st_size)
    folder = tmp_path / "label-only"
    folder.mkdir()
    return shutil.copy(smallest, folder)


def _make(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "nowhere.svs", "no such file"
    if kind == "empty dir":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", "directory contains no slide"
    if kind == "zero bytes":
        (tmp_path / "zero.svs").write_bytes(b"")
        return tmp_path / "zero.svs", "empty (0 bytes)"
    if kind == "text as svs":
        (tmp_path / "notes.svs").write_text("these are my notes, not a slide\n")
        return tmp_path / "notes.svs", "OpenSlide does not recognise"
    if kind == "text as tiff":
        (tmp_path / "notes.tif").write_text("II*\x00 but nothing else")
        return tmp_path / "notes.tif", "truncated or damaged"
    if kind == "truncated svs (header cut)":
        return _truncated_svs(tmp_path, 0.5), "truncated"
    if kind == "truncated svs (tail cut)":
        return _truncated_svs(tmp_path, 0.97), "truncated"
    if kind == "dicom openslide rejects":
        return _label_only_dicom(tmp_path), "No pyramid levels"
    if kind == "text as png":
        (tmp_path / "x.png").write_text("not a png")
        return tmp_path / "x.png", "not a readable image"
    raise ValueError(kind)


BAD = [
    "missing",
    "empty dir",
    "zero bytes",
    "text as svs",
    "text as tiff",
    "truncated svs (header cut)",
    "truncated svs (tail cut)",
    "dicom openslide rejects",
    "text as png",
]


@pytest.mark.parametrize("kind", BAD)
def test_open_slide_raises_one_line(tmp_path, kind):
    path, reason = _make(tmp_path, kind)
    with pytest.raises(SlideError) as info:
        open_slide(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and reason in message


@pytest.mark.parametrize("kind", BAD)
def test_cli_info_prints_one_line_and_exits_2(tmp_path, kind, capsys):
    path, reason = _make(tmp_path, kind)
    assert main(["info", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("nephro: error: ") and reason in err


def test_console_script_has_no_traceback_and_leaves_nothing_behind(tmp_path):
    path, _ = _make(tmp_path, "truncated svs (tail cut)")
    before = sorted(tmp_path.rglob("*"))
    result = subprocess.run(
        [sys.executable, "-m", "napari_nephro.cli", "info", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_unknown_backend_and_bad_mpp_are_user_errors(tmp_path, capsys):
    path = require_shared("wsi", "CMU-1-Small-Region.svs")
    with pytest.raises(SlideError, match="unknown backend"):
        open_slide(path, backend="bioformats")
    assert main(["info", str(path), "--mpp", "-3"]) == 2
    assert "argument --mpp: must be positive, not -3" in capsys.readouterr().err


def test_demo_without_a_display_says_how_to_run_headless(monkeypatch, capsys):
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "xvfb-run" in err


def test_demo_with_a_bad_slide_fails_before_any_window(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")  # a display is not what fails here
    (tmp_path / "bad.ndpi").write_text("no")
    assert main(["demo", str(tmp_path / "bad.ndpi")]) == 2
    assert "bad.ndpi" in capsys.readouterr().err


def test_malformed_ome_pixel_size_means_unknown_not_a_crash(tmp_path):
    from conftest import random_levels, write_pyramid

    path = write_pyramid(tmp_path / "comma.ome.tif", random_levels((128, 128), 1), "ome", mpp=0.5)
    data = path.read_bytes()
    assert b'PhysicalSizeX="0.5"' in data
    path.write_bytes(
        data.replace(b'PhysicalSizeX="0.5"', b'PhysicalSizeX="0,5"').replace(
            b'PhysicalSizeY="0.5"', b'PhysicalSizeY="0,5"'
        )
    )
    slide = open_slide(path)
    assert slide.mpp is None and slide.mpp_source == "unknown"


def test_an_unreadable_file_is_one_line(tmp_path, monkeypatch):
    import napari_nephro.io.open as opening

    def denied(path, backend):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(opening, "_open_backend", denied)
    path = tmp_path / "locked.svs"
    path.write_bytes(b"x" * 10)
    with pytest.raises(SlideError, match="Permission denied") as err:
        open_slide(path)
    assert "\n" not in str(err.value)


def test_a_dicom_folder_with_extensionless_files_is_a_slide_for_napari_too(tmp_path):
    import shutil

    from napari_nephro.io import can_open

    source = require_shared("wsi", "CMU-1-Small-Region-dicom")
    folder = tmp_path / "pacs-export"
    folder.mkdir()
    for i, f in enumerate(sorted(source.glob("*.dcm"))):
        shutil.copy(f, folder / f"IM{i:04d}")
    assert can_open(folder)
    assert open_slide(folder).level_shapes[0] == open_slide(source).level_shapes[0]


def test_a_png_too_large_for_pillow_says_what_to_do(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("RGB", (300, 200), "white").save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 60,000 px is then a "bomb", as 400 MP is by default
    with pytest.raises(SlideError, match="save it as a tiled pyramidal TIFF"):
        open_slide(path)
