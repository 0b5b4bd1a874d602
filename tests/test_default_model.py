"""The shipped default glomerulus model, and `nephro demo --headless`: the main job offline."""

from __future__ import annotations

import json
import math

import numpy as np
from PIL import Image

from conftest import require_shared
from napari_nephro.annotations import rasterize, read_annotations
from napari_nephro.annotations.omezarr import read_label_zarr
from napari_nephro.cli import main
from napari_nephro.evaluation import match_instances
from napari_nephro.io import open_slide
from napari_nephro.models import DEFAULT, TorchSegmenter, resolve_checkpoint
from napari_nephro.sample import SAMPLE_NAME, sample_annotations_path, sample_slide_path

MAX_MB = 25


def test_the_default_model_ships_small_with_its_provenance():
    folder = resolve_checkpoint(DEFAULT)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    assert size <= MAX_MB, f"{size:.1f} MB"
    made = json.loads((folder / "config.json").read_text())["provenance"]
    assert "AIDPATH" in made["data_attribution"] and "CC BY 4.0" in made["data_attribution"]
    assert made["recipe"]["epochs"] == len(made["history"]) and made["best_epoch"] >= 1
    segmenter = TorchSegmenter.from_checkpoint(DEFAULT, device="cpu")
    assert segmenter.classes == ["glomerulus"] and segmenter.fingerprint


def test_the_default_model_outlines_the_glomerulus_of_a_held_out_tile():
    """On an AIDPATH tile it never trained on, one object that outlines the annotated glomerulus."""
    from napari_nephro.inference import segment_region

    source = require_shared("glomeruli", "aidpath_pas")
    name = "10003.png"
    result = segment_region(open_slide(source / "images" / name, mpp=0.5), TorchSegmenter.from_checkpoint(DEFAULT))
    truth = np.asarray(Image.open(source / "masks" / name))[..., 0] > 0
    pred = result.array > 0
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.75
    assert result.summary.count == 1


def test_the_demo_finds_the_sample_slides_glomeruli(tmp_path, capsys):
    """`nephro demo --headless` on the sample: all annotated glomeruli but one at IoU >= 0.5, at most one false positive.

    The written GeoJSON is matched to the shipped annotations here, independently of the
    demo's own count, and the printed line must agree with that match.
    """
    out = tmp_path / "demo"
    assert main(["demo", "--headless", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    found = read_annotations(out / f"{SAMPLE_NAME}.glomeruli.geojson")
    truth = read_annotations(sample_annotations_path())
    shape = open_slide(sample_slide_path()).level_shapes[0]
    match = match_instances(rasterize(found, shape), rasterize(truth, shape), iou_threshold=0.5)
    assert match.n_true == 6
    assert f"{match.tp} of 6 annotated glomeruli found (IoU ≥ 0.5), {match.fp} false positive" in printed
    with Image.open(out / f"{SAMPLE_NAME}.overview.png") as image:
        assert image.mode == "RGB" and max(image.size) <= 1600
    assert match.tp >= match.n_true - 1 and match.fp <= 1, f"{match.tp} of 6 found, {match.fp} false positives"
    # then the shipped nuclei model: nuclei all over the tissue, on the haematoxylin-dark pixels
    from napari_nephro.tiling import read_scaled

    nuclei = np.asarray(read_label_zarr(out / f"{SAMPLE_NAME}.nuclei.zarr").levels[0])
    assert nuclei.shape == shape and "non-commercial" in printed
    count = len(np.unique(nuclei)) - 1
    assert f"{count:,} nuclei" in printed
    assert 1_000 < count / (shape[0] * shape[1] * 0.5**2 / 1e6) < 20_000  # per mm² of a 1 mm² kidney sample
    grey = read_scaled(open_slide(sample_slide_path()), (0, 0, shape[1], shape[0]), shape).mean(-1)
    assert grey[nuclei > 0].mean() < grey[nuclei == 0].mean() - 30


def test_demo_headless_writes_labels_polygons_and_an_overview(tmp_path, capsys):
    slide = require_shared("wsi", "CMU-1-Small-Region.svs")
    out = tmp_path / "demo"
    assert main(["demo", "--headless", "--slide", str(slide), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    labels = out / "CMU-1-Small-Region.glomeruli.zarr"
    geojson = out / "CMU-1-Small-Region.glomeruli.geojson"
    overview = out / "CMU-1-Small-Region.overview.png"
    for path in (labels, geojson, overview):
        assert str(path) in printed and path.exists()
    pyramid = read_label_zarr(labels)  # at the model's working scale (1 um/px), placed on the whole slide
    assert tuple(pyramid.slide_shape) == open_slide(slide).level_shapes[0]
    assert pyramid.levels[0].shape == tuple(math.ceil(n / pyramid.slide_downsample - 1e-6) for n in pyramid.slide_shape)
    assert 1.9 < pyramid.slide_downsample < 2.1  # 1 um/px over the slide's 0.499
    objects = read_annotations(geojson)
    assert f"{len(objects)} glomeruli found" in printed and set(objects.counts()) <= {"glomerulus"}
    assert "annotated" not in printed  # a user's slide comes without annotations: no score is made up
    with Image.open(overview) as image:
        assert max(image.size) <= 1600 and image.mode == "RGB"
    # a second run refuses to replace the first one's results unless told to, and then touches nothing else
    (out / "notes.txt").write_text("mine")
    geojson.write_bytes(b"{}")  # the user's edit of the first results must survive a refused run
    assert main(["demo", "--headless", "--slide", str(slide), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1 and geojson.read_bytes() == b"{}"
    args = ["demo", "--headless", "--slide", str(slide), "--out", str(out), "--device", "cpu", "--overwrite"]
    assert main(args) == 0
    assert (out / "notes.txt").read_text() == "mine" and len(read_annotations(geojson)) == len(objects)


def test_a_refused_demo_model_leaves_no_folder(tmp_path, capsys):
    slide = require_shared("wsi", "CMU-1-Small-Region.svs")
    out = tmp_path / "demo"
    assert main(["demo", "--headless", "--slide", str(slide), "--out", str(out), "--model", str(tmp_path / "no")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not out.exists()


def test_segment_takes_the_default_model_by_name(tmp_path):
    slide = require_shared("wsi", "CMU-1-Small-Region.svs")
    out = tmp_path / "cmu.geojson"
    assert main(["segment", str(slide), "--model", "default", "--region", "0,0,1024,1024", "--out", str(out)]) == 0
    assert out.exists()


def test_demo_refuses_a_slide_given_twice(capsys):
    assert main(["demo", "--headless", "a.svs", "--slide", "b.svs"]) == 2
    assert "give the slide once" in capsys.readouterr().err
    assert main(["demo", "--no-such-option"]) == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
