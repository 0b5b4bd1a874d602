"""`nephro info` on the real slides, as a user reads it and as a script parses it."""

from __future__ import annotations

import json

import pytest

from conftest import require_shared
from napari_nephro.cli import main

pytestmark = pytest.mark.shared


@pytest.mark.parametrize(
    ("name", "shapes", "mpp"),
    [
        ("CMU-1-Small-Region.svs", [(2220, 2967)], 0.499),
        ("tcga-cr-7395-01a-01-ts1.svs", [(4443, 3567), (2221, 1783)], None),
        ("CMU-1-Small-Region-dicom", [(2220, 2967)], 0.499),
        ("small_HE_levels.tiff", [(300, 250), (150, 125), (75, 62), (37, 31)], None),
    ],
)
def test_info_json_lists_levels_and_mpp(name, shapes, mpp, capsys):
    assert main(["info", str(require_shared("wsi", name)), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [(lv["width"], lv["height"]) for lv in info["levels"]] == shapes
    assert info["mpp"] == (pytest.approx(mpp) if mpp else None)
    assert info["levels"][0]["tile_width"] > 0 and info["backend"] in ("openslide", "tifffile")


def test_info_table_names_what_a_pathologist_checks(capsys):
    assert main(["info", str(require_shared("wsi", "CMU-1-Small-Region.svs"))]) == 0
    out = capsys.readouterr().out
    for expected in ("aperio", "0.4990 um/px (file)", "20x", "label, macro, thumbnail", "240x240", "2220", "2967"):
        assert expected in out


def test_info_accepts_a_pixel_size_for_a_slide_without_one(capsys):
    path = require_shared("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    assert main(["info", str(path), "--json", "--mpp", "0.25"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mpp_source"] == "user" and info["levels"][1]["mpp_x"] == pytest.approx(0.25 * 4443 / 2221, rel=1e-4)


def test_demo_renders_the_sample_slide_in_napari(tmp_path):
    """The README's napari command, headless: the default model over the shipped sample, shown in napari."""
    import os
    import shutil
    import subprocess

    import numpy as np
    from PIL import Image

    if not os.environ.get("DISPLAY"):
        pytest.skip("needs an X display (run the tests under xvfb-run, as the README says)")
    nephro = shutil.which("nephro")
    assert nephro, "the nephro console script is not installed"
    shot = tmp_path / "demo.png"
    out = tmp_path / "demo"
    result = subprocess.run(
        [nephro, "demo", "--screenshot", str(shot), "--out", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from napari_nephro.annotations import read_annotations
    from napari_nephro.annotations.omezarr import read_label_zarr
    from napari_nephro.sample import SAMPLE_NAME, SAMPLE_SHAPE

    labels = read_label_zarr(out / f"{SAMPLE_NAME}.glomeruli.zarr")  # the whole sample, at the model's scale
    assert labels.slide_shape == SAMPLE_SHAPE and labels.mpp == 1.0
    assert set(read_annotations(out / f"{SAMPLE_NAME}.glomeruli.geojson").counts()) <= {"glomerulus"}
    assert "annotated glomeruli found" in result.stdout  # the sample is scored against its annotations
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600
    pink = (pixels[..., 0] > 180) & (pixels[..., 1] > 100) & (pixels[..., 1] < 200) & (pixels[..., 2] > 160)
    pink &= pixels[..., 0] > pixels[..., 1] + 20
    assert pink.mean() > 0.02  # the slide's PAS-pink tissue is on screen, not a blank canvas


def test_the_command_starts_without_loading_torch_or_napari():
    """`nephro info` must answer in a blink: the heavy libraries load only for the commands that need them."""
    import subprocess
    import sys

    code = "import sys, napari_nephro.cli; print(sorted(m for m in ('torch', 'napari', 'zarr') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
