"""Making a review project: patches sampled in tissue, every model run on them through the engine, resumably.

On the real CMU-1 slide, with the shipped nuclei model (real and fast on a CPU) and
small random-weight glomerulus checkpoints built here.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from conftest import require_shared
from napari_nephro.io import open_slide
from napari_nephro.models import ModelConfig, build_network, load_nuclei_model, save_checkpoint
from napari_nephro.models.segmenter import checkpoint_fingerprint
from napari_nephro.pipelines.review import add_model, new_project, predict_project, project_status
from napari_nephro.review import layout
from napari_nephro.review.layout import ReviewError
from napari_nephro.review.sampling import MIN_TISSUE, sample_patches, slide_ids
from napari_nephro.tiling import read_scaled, tissue_fraction

SIZE, MPP = 128, 0.5
NUCLEI = ["nuclei", "again=nuclei"]  # the shipped model under two names: two models, one download-free network


@pytest.fixture(scope="module")
def slide_path():
    return require_shared("wsi", "CMU-1-Small-Region.svs")


@pytest.fixture(scope="module")
def slide(slide_path):
    with open_slide(slide_path) as opened:
        yield opened


@pytest.fixture(scope="module")
def project(slide_path, tmp_path_factory):
    """4 patches, two models, made in one uninterrupted run: the reference the other tests compare with."""
    root = tmp_path_factory.mktemp("review") / "project"
    return new_project(root, [slide_path], NUCLEI, patches=4, size=SIZE, mpp=MPP, seed=3, device="cpu")


def glomerulus_checkpoint(folder, seed: int, classes=("normal", "sclerosed")):
    folder.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = ModelConfig(
        arch="unet",
        encoder="mobilenet_v2",
        decoder={"decoder_channels": [16, 8, 8, 8, 8]},
        classes=list(classes),
        mpp=2.0,
        tile_size=128,
        overlap=0,
        input_size=64,
    )
    return save_checkpoint(build_network(config), config, folder, overwrite=True)


def overlaps(a: layout.Patch, b: layout.Patch) -> bool:
    return a.x < b.x + b.width and b.x < a.x + a.width and a.y < b.y + b.height and b.y < a.y + a.height


def whole_files_only(root) -> None:
    leftovers = [p for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith((".tmp", ".old"))]
    assert not leftovers, leftovers


# --- sampling ------------------------------------------------------------------------------------------------


def test_sampling_is_reproducible_lies_in_tissue_and_never_overlaps(slide):
    patches = sample_patches([("cmu", slide)], 8, SIZE, MPP, seed=0)
    assert patches == sample_patches([("cmu", slide)], 8, SIZE, MPP, seed=0)
    other = sample_patches([("cmu", slide)], 8, SIZE, MPP, seed=1)
    assert {(p.x, p.y) for p in other} != {(p.x, p.y) for p in patches}
    assert [p.patch for p in patches] == [layout.patch_id(i) for i in range(8)]
    height, width = slide.level_shapes[0]
    side = SIZE * MPP / slide.mpp  # 128 px at 0.5 um/px on a 0.499 um/px slide
    fractions = []
    for i, p in enumerate(patches):
        assert p.slide == "cmu" and p.width == pytest.approx(side) and p.height == pytest.approx(side)
        assert p.x >= 0 and p.y >= 0 and p.x + p.width <= width and p.y + p.height <= height
        assert not any(overlaps(p, q) for q in patches[i + 1 :])
        fractions.append(tissue_fraction(read_scaled(slide, (p.x, p.y, p.width, p.height), (SIZE, SIZE))))
    # judged on a thumbnail, so a patch at the tissue's edge may come out a little under the bar at full resolution
    assert min(fractions) >= MIN_TISSUE - 0.1, fractions
    whole = tissue_fraction(read_scaled(slide, (0, 0, width, height), (height // 8, width // 8)))
    assert np.mean(fractions) > whole + 0.3  # the slide is two thirds glass: random boxes would be too


def test_stratified_sampling_takes_as_many_from_each_slide(slide, slide_path):
    ids = slide_ids([slide_path, slide_path])
    assert ids == ["CMU-1-Small-Region", "CMU-1-Small-Region-2"]
    patches = sample_patches([(ids[0], slide), (ids[1], slide)], 5, SIZE, MPP, seed=0, sampling="stratified")
    assert [p.slide for p in patches] == [ids[0], ids[1], ids[0], ids[1], ids[0]]  # 3 + 2, one of each in turn
    for i, p in enumerate(patches):
        assert not any(overlaps(p, q) for q in patches[i + 1 :] if q.slide == p.slide)
    pooled = sample_patches([(ids[0], slide), (ids[1], slide)], 5, SIZE, MPP, seed=0)
    assert pooled != patches


def test_too_many_patches_say_how_many_fit(slide):
    with pytest.raises(ReviewError) as info:
        sample_patches([("cmu", slide)], 400, SIZE, MPP, seed=0)
    message = str(info.value)
    fit = int(message.split()[1])  # "only N patches ..."
    assert 0 < fit < 400 and "\n" not in message and "fewer patches" in message and "smaller size" in message
    assert len(sample_patches([("cmu", slide)], fit, SIZE, MPP, seed=0)) == fit  # and that many do fit


# --- a nuclei project ----------------------------------------------------------------------------------------


def test_every_model_predicts_every_patch_and_finds_the_dark_nuclei(project, slide):
    proj = layout.read_project(project)
    patches = layout.read_patches(project)
    assert len(patches) == 4 and proj.model_names == ["nuclei", "again"]
    assert patches == sample_patches([("CMU-1-Small-Region", slide)], 4, SIZE, MPP, seed=3)
    rows = layout.read_rows(project / layout.PREDICTIONS_CSV, layout.PREDICTION_FIELDS)
    assert sorted((r["patch"], r["model"]) for r in rows) == sorted(
        (p.patch, m) for p in patches for m in proj.model_names
    )
    for row in rows:
        patch = next(p for p in patches if p.patch == row["patch"])
        png = np.asarray(Image.open(layout.patch_png(project, patch.patch)))
        assert png.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(
            png, read_scaled(slide, (patch.x, patch.y, patch.width, patch.height), (SIZE,) * 2)
        )
        labels = layout.read_labels(layout.prediction_tif(project, row["model"], patch.patch))
        assert labels.shape == (SIZE, SIZE) and labels.dtype == np.uint32
        assert int(row["objects"]) == len(np.unique(labels)) - 1 > 0
        assert not layout.prediction_classes(project, row["model"], patch.patch).exists()  # one class: no JSON
        # nuclei are haematoxylin-dark, and the labels lie on them, not beside them: shifted by a nucleus'
        # radius (3 um) they cover paler pixels
        grey = png.mean(axis=-1)
        inside = grey[labels > 0].mean()
        assert inside < grey[labels == 0].mean() - 20
        for shift in ((6, 0), (-6, 0), (0, 6), (0, -6)):
            assert inside < grey[np.roll(labels, shift, axis=(0, 1)) > 0].mean()


def test_provenance_is_recorded(project, slide_path):
    proj = layout.read_project(project)
    assert (proj.task, proj.size, proj.mpp, proj.seed, proj.sampling) == ("nuclei", SIZE, MPP, 3, "random")
    assert [(s.id, s.path, s.mpp) for s in proj.slides] == [("CMU-1-Small-Region", str(slide_path), 0.499)]
    shipped = load_nuclei_model("nuclei", device="cpu")
    for entry, spec in zip(proj.models, ("nuclei", "nuclei"), strict=True):
        assert (entry.spec, entry.family, entry.fingerprint, entry.mpp) == (spec, "nuclei", shipped.fingerprint, 0.5)
        assert entry.licence == shipped.licence != ""


def test_status_counts_predictions_and_patches_each_rater_finished(project, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(project, root)
    layout.append_rating(root, "ann", "p0001", "nuclei", "good")
    layout.append_rating(root, "ann", "p0001", "again", "bad")
    layout.append_rating(root, "ann", "p0002", "nuclei", "medium")  # p0002 not rated for `again`: not finished
    layout.append_rating(root, "bob", "p0003", "again", "good")
    status = project_status(root)
    assert status["patches"] == 4 and status["models"] == ["nuclei", "again"]
    assert status["predictions"] == {"nuclei": 4, "again": 4} and status["complete"] is True
    assert status["raters"] == {"ann": 1, "bob": 0}
    layout.prediction_tif(root, "again", "p0004").unlink()  # a prediction whose file is gone is not done
    assert project_status(root)["predictions"]["again"] == 3 and not project_status(root)["complete"]
    assert predict_project(root, device="cpu") == 1 and project_status(root)["complete"]


def test_a_cancelled_run_resumes_and_ends_identical_to_an_uninterrupted_one(project, slide_path, tmp_path):
    seen = []
    root = new_project(
        tmp_path / "p",
        [slide_path],
        NUCLEI,
        patches=4,
        size=SIZE,
        mpp=MPP,
        seed=3,
        device="cpu",
        progress=lambda done, total, text="": seen.append((done, total)),
        cancel=lambda: len(seen) > 3,  # the first call reports the start: stop after 3 predictions
    )
    assert seen[-1] == (3, 8) and project_status(root)["complete"] is False
    assert len(list((root / "predictions").rglob("*.tif"))) == 3
    whole_files_only(root)
    with pytest.raises(ReviewError, match="--overwrite"):
        new_project(root, [slide_path], NUCLEI, patches=4, size=SIZE, mpp=MPP, seed=3, device="cpu")
    seen.clear()
    assert predict_project(root, device="cpu", progress=lambda d, t, text="": seen.append((d, t))) == 5
    assert seen[0] == (3, 8) and seen[-1] == (8, 8)
    assert predict_project(root, device="cpu") == 0
    assert (root / layout.PATCHES_CSV).read_text() == (project / layout.PATCHES_CSV).read_text()
    ours = {
        (r["patch"], r["model"]): r["objects"]
        for r in layout.read_rows(root / "predictions.csv", layout.PREDICTION_FIELDS)
    }
    theirs = {
        (r["patch"], r["model"]): r["objects"]
        for r in layout.read_rows(project / "predictions.csv", layout.PREDICTION_FIELDS)
    }
    assert ours == theirs and len(ours) == 8
    for patch, model in ours:
        png = layout.patch_png(root, patch).read_bytes()
        assert png == layout.patch_png(project, patch).read_bytes()
        np.testing.assert_array_equal(
            layout.read_labels(layout.prediction_tif(root, model, patch)),
            layout.read_labels(layout.prediction_tif(project, model, patch)),
        )
    whole_files_only(root)


def test_mistakes_are_one_line_and_write_nothing(slide_path, tmp_path):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide at all")
    checkpoint = glomerulus_checkpoint(tmp_path / "glom", 0)
    cases = [
        (dict(slides=[slide_path, broken], models=["nuclei"]), "broken.svs"),
        (dict(slides=[slide_path], models=["nuclei"], patches=400), "fit in the tissue"),
        (dict(slides=[slide_path], models=["nuclei", str(checkpoint)]), "one kind"),
        (dict(slides=[slide_path], models=["nuclei:" + str(tmp_path / "nowhere")]), "model nowhere:"),
        (dict(slides=[slide_path], models=["a=nuclei", "a=nuclei"]), "twice"),
        (dict(slides=[slide_path], models=["bad name=nuclei"]), "model name"),
    ]
    for case, words in cases:
        with pytest.raises(ReviewError) as info:
            new_project(tmp_path / "p", **{"size": SIZE, "mpp": MPP, "device": "cpu", **case})
        assert words in str(info.value) and "\n" not in str(info.value), (case, str(info.value))
        assert not (tmp_path / "p").exists()
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "notes.txt").write_text("mine")
    for overwrite, words in ((False, "--overwrite"), (True, "not a review project")):
        with pytest.raises(ReviewError, match=words):
            new_project(tmp_path / "p", [slide_path], ["nuclei"], size=SIZE, mpp=MPP, overwrite=overwrite)
    assert (tmp_path / "p" / "notes.txt").read_text() == "mine"


# --- a glomerulus project ------------------------------------------------------------------------------------


def test_a_glomerulus_project_with_classes_end_to_end(slide_path, tmp_path):
    first = glomerulus_checkpoint(tmp_path / "unet-a", 0)
    root = new_project(tmp_path / "glom", [slide_path], [str(first)], patches=3, size=64, device="cpu")
    proj = layout.read_project(root)
    assert proj.task == "glomeruli" and proj.mpp == 2.0  # the model's working scale by default
    (entry,) = proj.models
    assert (entry.name, entry.family, entry.fingerprint) == ("unet-a", "unet", checkpoint_fingerprint(first))
    found = 0
    for patch in layout.read_patches(root):
        assert patch.width == pytest.approx(64 * 2.0 / 0.499)
        labels = layout.read_labels(layout.prediction_tif(root, "unet-a", patch.patch))
        assert labels.shape == (64, 64)
        classes = json.loads(layout.prediction_classes(root, "unet-a", patch.patch).read_text())
        ids = set(np.unique(labels).tolist()) - {0}
        assert {int(k) for k in classes} == ids and set(classes.values()) <= {"normal", "sclerosed"}
        for i in ids:  # an id is one connected object
            assert ndimage.label(labels == i, structure=np.ones((3, 3)))[1] == 1
        found += len(ids)
    assert found > 0  # random weights still paint something

    # a second round: a fine-tuned checkpoint is added and run on the same patches
    second = glomerulus_checkpoint(tmp_path / "second" / "unet-a", 1)
    entry = add_model(root, str(second), device="cpu")
    assert entry.name == "unet-a-2" and entry.fingerprint == checkpoint_fingerprint(second)
    status = project_status(root)
    assert status["models"] == ["unet-a", "unet-a-2"] and status["predictions"] == {"unet-a": 3, "unet-a-2": 3}
    with pytest.raises(ReviewError, match="already in the project as model unet-a"):
        add_model(root, f"again={first}", device="cpu")
    with pytest.raises(ReviewError, match="one kind"):
        add_model(root, "nuclei", device="cpu")
    assert layout.read_project(root).model_names == ["unet-a", "unet-a-2"]


def test_changed_weights_are_refused_not_mixed_in(slide_path, tmp_path):
    folder = glomerulus_checkpoint(tmp_path / "unet", 0, classes=("glomerulus",))
    calls = []
    root = new_project(
        tmp_path / "glom",
        [slide_path],
        [f"mine={folder}"],
        patches=3,
        size=64,
        device="cpu",
        progress=lambda done, total, text="": calls.append(done),
        cancel=lambda: len(calls) > 1,  # one prediction made, two to go
    )
    assert project_status(root)["predictions"] == {"mine": 1}
    assert not layout.prediction_classes(root, "mine", "p0001").exists()  # one class: no classes JSON
    glomerulus_checkpoint(folder, 7, classes=("glomerulus",))  # retrained in place
    with pytest.raises(ReviewError) as info:
        predict_project(root, device="cpu")
    assert "model mine's weights changed" in str(info.value) and "\n" not in str(info.value)
    assert project_status(root)["predictions"] == {"mine": 1}


def test_slides_without_a_pixel_size_take_the_one_given_and_stratified_projects_sample_each(slide_path, tmp_path):
    """The TCGA slide states no mpp and has two levels: its patches are read from the nearest one."""
    tcga = require_shared("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    with pytest.raises(ReviewError, match="pixel size is unknown"):
        new_project(tmp_path / "p", [tcga], ["nuclei"], patches=2, size=SIZE, mpp=MPP, device="cpu")
    assert not (tmp_path / "p").exists()
    root = new_project(
        tmp_path / "p",
        [tcga, slide_path],
        ["nuclei"],
        patches=3,
        size=SIZE,
        mpp=1.0,
        sampling="stratified",
        slide_mpp=0.25,  # for the slide that states none; CMU-1 keeps its own 0.499
        device="cpu",
    )
    proj = layout.read_project(root)
    assert [(s.id, s.mpp) for s in proj.slides] == [("tcga-cr-7395-01a-01-ts1", 0.25), ("CMU-1-Small-Region", 0.499)]
    patches = layout.read_patches(root)
    assert [p.slide for p in patches] == ["tcga-cr-7395-01a-01-ts1", "CMU-1-Small-Region", "tcga-cr-7395-01a-01-ts1"]
    assert patches[0].width == pytest.approx(SIZE * 1.0 / 0.25)
    with open_slide(tcga, mpp=0.25) as opened:
        for p in patches[::2]:
            png = np.asarray(Image.open(layout.patch_png(root, p.patch)))
            np.testing.assert_array_equal(png, read_scaled(opened, (p.x, p.y, p.width, p.height), (SIZE, SIZE)))
    assert project_status(root)["complete"]
