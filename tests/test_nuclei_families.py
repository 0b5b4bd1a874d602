"""Each nuclei family, built small with random weights, through the instance engine and the CLI on a real image.

Random weights find no real nuclei, so these tests check what the engine and the
command must guarantee whatever the model: every object the model gave in a tile's
core comes back once, with a unique id, inside the image, in every output.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import require_shared
from napari_nephro.cli import main
from napari_nephro.inference import read_nuclei_table, segment_instances_region
from napari_nephro.io import open_slide


@pytest.fixture(scope="module")
def kidney():
    path = require_shared("nuclei", "nuinsseg_kidney", "test", "images", "human_kidney_07.png")
    return path, open_slide(path, mpp=0.25)


def check_consistent(result, shape) -> None:
    assert result.stats.complete and result.array.shape == shape
    ids = np.unique(result.array)
    ids = ids[ids != 0]
    assert ids.tolist() == sorted(n.id for n in result.nuclei)  # every kept nucleus on the image, once
    h, w = shape
    assert all(0 <= n.x < w and 0 <= n.y < h for n in result.nuclei)
    assert all(0 <= n.score <= 1 and n.area_um2 > 0 for n in result.nuclei)


@pytest.fixture(scope="module")
def tiny_cellpose_file(tmp_path_factory):
    from napari_nephro.models.cellpose_classic import CellposeNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cellpose") / "tiny_nuclei"
    torch.save(CellposeNet((2, 8, 16, 32, 64), diam_mean=17.0).state_dict(), path)
    return path


@pytest.mark.shared
def test_a_small_classic_cellpose_net_through_the_engine(kidney, tiny_cellpose_file):
    from napari_nephro.models.nuclei import load_nuclei_model

    _, slide = kidney
    model = load_nuclei_model(f"cellpose:{tiny_cellpose_file}", device="cpu", diameter=7.5)
    assert model.kind == "instance" and model.mpp == pytest.approx(7.5 / 17)
    result = segment_instances_region(slide, model, skip_background=False)
    check_consistent(result, slide.level_shapes[0])


@pytest.mark.shared
def test_nephro_segment_with_a_cellpose_file_writes_its_table(kidney, tiny_cellpose_file, tmp_path, capsys):
    path, _ = kidney
    out = tmp_path / "nuclei.csv"
    args = ["segment", str(path), "--mpp", "0.25", "--model", f"cellpose:{tiny_cellpose_file}", "--out", str(out)]
    assert main([*args, "--device", "cpu", "--all-tiles"]) == 0
    rows = read_nuclei_table(out)
    printed = capsys.readouterr().out
    assert f"{len(rows):,} nuclei" in printed or f"{len(rows):,} nucleus" in printed
    assert [r["id"] for r in rows] == list(range(1, len(rows) + 1))


@pytest.mark.shared
def test_nephro_segment_names_the_missing_cellpose_weights_in_one_line(kidney, tmp_path, capsys, monkeypatch):
    path, _ = kidney
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    out = tmp_path / "nuclei.csv"
    assert main(["segment", str(path), "--mpp", "0.25", "--model", "cellpose:cyto3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "https://www.cellpose.org/models/" in err[0] and not out.exists()


@pytest.mark.shared
def test_a_tiny_cellvit_through_the_engine(kidney):
    from napari_nephro.models.cellvit import CellViTSegmenter, CellViTSpec, build_cellvit

    _, slide = kidney
    torch.manual_seed(0)
    spec = CellViTSpec("CellViT", embed_dim=32, depth=4, heads=2, extract=(1, 2, 3, 4))
    model = CellViTSegmenter(build_cellvit(spec), spec, device="cpu", tile_size=256, overlap=64)
    result = segment_instances_region(slide, model, skip_background=False)
    check_consistent(result, slide.level_shapes[0])
    assert set(result.classes) == {"neoplastic", "inflammatory", "connective", "dead", "epithelial"}


@pytest.mark.shared
def test_a_tiny_stardist_model_through_the_engine_and_the_cli(kidney, tmp_path, capsys):
    if not os.environ.get("CI"):  # CI installs the testing extra, TensorFlow with it: there it must run
        pytest.importorskip("tensorflow")
    from test_stardist import BUILD_TINY, run_python

    path, slide = kidney
    done = run_python(BUILD_TINY, str(tmp_path), str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    from napari_nephro.models.nuclei import load_nuclei_model

    model = load_nuclei_model(f"stardist:{tmp_path / 'tiny'}", device="cpu")
    try:
        result = segment_instances_region(slide, model, skip_background=False)
    finally:
        model.close()
    check_consistent(result, slide.level_shapes[0])
    assert result.nuclei  # the tiny model's rays make objects above its thresholds
    out = tmp_path / "nuclei.geojson"
    args = ["segment", str(path), "--mpp", "0.25", "--model", f"stardist:{tmp_path / 'tiny'}", "--out", str(out)]
    assert main([*args, "--all-tiles", "--prob-threshold", "0.99"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and ("nuclei" in printed or "nucleus" in printed)
    assert json.loads(out.read_text())["type"] == "FeatureCollection"
