"""`nephro segment` on a real slide, and each network of the family through the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require_shared
from napari_nephro.annotations.omezarr import read_label_zarr
from napari_nephro.cli import main
from napari_nephro.inference import partial_path, segment_region
from napari_nephro.inference.plan import cells
from napari_nephro.io import open_slide
from napari_nephro.models import TorchSegmenter, build_network, save_checkpoint
from test_models import small_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A fresh U-Net at the paper's geometry: 1024 px tiles at 1 um/px, 256 px overlap, 320 px input."""
    out = tmp_path_factory.mktemp("ckpt") / "unet"
    assert main(["model", "init", "--arch", "unet", "--encoder", "resnet18", "--out", str(out)]) == 0
    return out


def test_whole_slide_run_on_a_real_slide_has_its_shape_and_scale(checkpoint, tmp_path, capsys):
    slide_path = require_shared("wsi", "CMU-1-Small-Region.svs")
    out = tmp_path / "cmu.zarr"
    assert main(["segment", str(slide_path), "--model", str(checkpoint), "--out", str(out), "--device", "cpu"]) == 0
    assert f"{out} at 1 um/px" in capsys.readouterr().out  # the model's scale, by default
    slide = open_slide(slide_path)
    labels = read_label_zarr(out)
    scale = 1.0 / slide.mpp
    assert labels.levels[0].shape == tuple(cells(n, scale) for n in slide.level_shapes[0])
    assert labels.mpp == pytest.approx(1.0) and labels.classes == {1: "glomerulus"}
    assert labels.slide_shape == slide.level_shapes[0] and labels.slide_downsample == pytest.approx(scale)
    assert set(np.unique(np.asarray(labels.levels[-1]))) <= {0, 1}
    assert not partial_path(out).exists()

    full = tmp_path / "full.zarr"
    argv = ["segment", str(slide_path), "--model", str(checkpoint), "--out", str(full), "--out-scale", "full"]
    assert main(argv) == 0
    assert f"{full} at 0.499 um/px" in capsys.readouterr().out
    labels = read_label_zarr(full)
    assert labels.levels[0].shape == slide.level_shapes[0] and labels.mpp == pytest.approx(slide.mpp)


def test_ctrl_c_keeps_a_partial_run_that_resume_finishes(checkpoint, tmp_path, capsys, monkeypatch):
    slide_path = require_shared("wsi", "CMU-1-Small-Region.svs")
    out = tmp_path / "cmu.geojson"
    args = ["segment", str(slide_path), "--model", str(checkpoint), "--out", str(out), "--tile", "512"]
    args += ["--overlap", "128", "--batch", "1", "--all-tiles"]
    real_predict, calls, interrupt = TorchSegmenter.predict, [], [True]

    def interrupted(self, tiles):
        calls.append(len(tiles))
        if len(calls) == 8 and interrupt:  # two of the four rows of tiles are done
            interrupt.clear()
            raise KeyboardInterrupt
        return real_predict(self, tiles)

    monkeypatch.setattr(TorchSegmenter, "predict", interrupted)
    assert main(args) == 130
    assert "--resume" in capsys.readouterr().err
    assert not out.exists() and partial_path(out).exists()
    assert read_label_zarr(partial_path(out)).slide_shape == open_slide(slide_path).level_shapes[0]

    assert main(args) == 2
    assert "unfinished run" in capsys.readouterr().err
    calls.clear()
    assert main([*args, "--resume"]) == 0
    assert out.exists() and not partial_path(out).exists()
    # 4 rows of 3 tiles of 512 px at 1 um/px: only the unfinished rows ran again, and the last finished
    # one, whose overlap the next row blends with
    assert 0 < len(calls) <= 9


def test_bad_requests_end_in_one_line(checkpoint, tmp_path, capsys):
    png = tmp_path / "plain.png"
    Image.fromarray(np.full((300, 300, 3), 200, np.uint8)).save(png)
    base = ["segment", str(png), "--model", str(checkpoint)]
    cases = [
        ([*base, "--out", str(tmp_path / "a.zarr")], "--mpp"),
        ([*base, "--mpp", "0.5", "--region", "900,900,10,10", "--out", str(tmp_path / "b.zarr")], "outside"),
        ([*base, "--mpp", "0.5", "--out", str(tmp_path / "c.png")], ".zarr"),
        (["segment", str(png), "--model", str(tmp_path), "--mpp", "0.5", "--out", str(tmp_path / "d.zarr")], "config"),
    ]
    if not torch.cuda.is_available():
        cases.append(([*base, "--mpp", "0.5", "--device", "cuda", "--out", str(tmp_path / "e.zarr")], "no usable"))
    for args, reason in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert reason in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.png"]


@pytest.mark.parametrize("arch", ["unet", "unet3plus", "swin_unet"])
def test_each_network_segments_a_region_through_the_engine(arch, tmp_path):
    """A checkpoint of each architecture, loaded from its folder, gives a label map of the region's shape."""
    slide_path = require_shared("wsi", "CMU-1-Small-Region.svs")
    torch.manual_seed(0)
    config = small_config(arch, ("normal", "sclerosed"), input_size=224 if arch == "swin_unet" else 256)
    config.tile_size, config.overlap = 512, 128
    folder = save_checkpoint(build_network(config), config, tmp_path / arch)
    segmenter = TorchSegmenter.from_checkpoint(folder, device="cpu")
    result = segment_region(open_slide(slide_path), segmenter, (500, 400, 1200, 900), batch_size=2)
    assert result.array.shape == (900, 1200) and result.classes == {1: "normal", 2: "sclerosed"}
    assert result.stats.complete and result.stats.predicted > 0
    assert set(np.unique(result.array)) <= {0, 1, 2}


def test_sizes_of_zero_are_refused_not_replaced_by_defaults(checkpoint, tmp_path, capsys):
    png = tmp_path / "plain.png"
    Image.fromarray(np.full((300, 300, 3), 200, np.uint8)).save(png)
    args = ["segment", str(png), "--model", str(checkpoint), "--mpp", "0.5", "--out", str(tmp_path / "a.zarr")]
    assert main([*args, "--tile", "0"]) == 2
    assert "tile must be positive" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(["demo", "--headless", "--slide", str(png), "--mpp", "0.5", "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and err.count("\n") == 1
