"""Training nuclei networks: instance data at the working scale, HoVer targets and loss, resume, CLI, CellViT."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import require_shared
from napari_nephro.cli import main
from napari_nephro.evaluation.instances import aggregated_jaccard
from napari_nephro.models import ModelConfig
from napari_nephro.models.checkpoint import load_checkpoint
from napari_nephro.models.hovernet import hv_targets
from napari_nephro.models.nuclei import load_nuclei_model
from napari_nephro.training.errors import TrainingError
from napari_nephro.training.nuclei_data import nucleus_images
from napari_nephro.training.nuclei_loop import MARKER_GRID, HoverLoss, NucleiRecipe, draw_batch, train_nuclei

SMALL = {"encoder": "mobilenet_v2", "decoder": {"decoder_channels": [32, 16, 16, 8, 8]}}
TINY = NucleiRecipe(epochs=3, steps_per_epoch=2, batch_size=2, crop=64, lr=1e-3, seed=5, val_fraction=0.34)


def small_config(mpp: float = 0.5) -> ModelConfig:
    return ModelConfig(
        arch="unet", classes=["nucleus"], mpp=mpp, tile_size=256, overlap=32, input_size=256, heads="hover", **SMALL
    )


@pytest.fixture(scope="module")
def miccai(tmp_path_factory):
    """Three 40x MICCAI 2015 images and their label TIFFs, linked into images/ and labels/."""
    source = require_shared("nuclei", "miccai2015_tcga")
    root = tmp_path_factory.mktemp("miccai")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for name in ("image08", "image09", "image14"):
        (root / "images" / f"{name}.png").symlink_to(source / f"{name}.png")
        (root / "labels" / f"{name}_labels.tif").symlink_to(source / f"{name}_labels.tif")
    return root


@pytest.fixture(scope="module")
def images(miccai):
    return nucleus_images(miccai / "labels", miccai / "images", mpp=0.5, image_mpp=0.25)


def test_images_are_read_at_the_working_scale_with_every_nucleus(images, miccai):
    import tifffile

    assert [n.name for n in images] == ["image08", "image09", "image14"]
    for item in images:
        full = tifffile.imread(miccai / "labels" / f"{item.name}_labels.tif")
        assert item.image.shape[:2] == item.labels.shape == tuple(round(s / 2) for s in full.shape)
        assert item.image.dtype == np.uint8 and item.labels.dtype == np.int32
        true = np.unique(full).size - 1
        assert item.count >= 0.97 * true  # a nucleus is lost only where nearest sampling misses a sliver
        # nuclei are dark: haematoxylin makes them darker than what lies around them
        assert item.image[item.labels > 0].mean() < item.image[item.labels == 0].mean() - 30


def test_monuseg_xml_regions_become_instances_at_the_working_scale():
    folder = require_shared("nuclei", "monuseg_nonhidden", "test")
    xml = folder / "annotations" / "TCGA-2Z-A9J9-01A-01-TS1.xml"  # the kidney image: 575 nuclei
    (item,) = nucleus_images(xml, folder / "images" / "TCGA-2Z-A9J9-01A-01-TS1.png", mpp=0.5)
    # the pixel size ImageScope recorded in the XML (0.2527 um) is the PNG's: 1000 px are 505 at 0.5 um/px
    assert item.mpp == pytest.approx(0.2527) and item.labels.shape == (505, 505)
    assert 0.97 * 575 <= item.count <= 575


def test_unknown_pixel_sizes_and_missing_images_are_refused_in_one_line(miccai, tmp_path):
    with pytest.raises(TrainingError, match="pixel size is unknown"):
        nucleus_images(miccai / "labels", miccai / "images", mpp=0.5)
    (tmp_path / "other_labels.tif").symlink_to(miccai / "labels" / "image08_labels.tif")
    with pytest.raises(Exception, match="no image"):
        nucleus_images(tmp_path, miccai / "images", mpp=0.5, image_mpp=0.25)


def test_augmented_crops_keep_image_and_instances_together(images):
    from napari_nephro.training.augment import Augment

    torch.manual_seed(0)
    weights = torch.ones(len(images), dtype=torch.float64)
    x, labels = draw_batch(images, weights, TINY, torch.Generator().manual_seed(1), Augment())
    assert x.shape == (2, 3, 64, 64) and labels.shape == (2, 64, 64)
    for image, lab in zip(x, labels, strict=True):
        if (lab > 0).sum() > 50:  # nuclei stay on the dark pixels after flips, rotations and zoom
            grey = image.mean(0).numpy()
            assert grey[lab > 0].mean() < grey[lab == 0].mean()


def test_the_loss_is_least_for_the_exact_targets():
    labels = np.zeros((1, 64, 64), np.int32)
    labels[0, 10:30, 12:28] = 1
    labels[0, 30:50, 30:52] = 2
    fg = torch.from_numpy((labels > 0).astype(np.float32))
    hv = torch.from_numpy(hv_targets(labels[0]))[None]
    loss = HoverLoss()
    exact = loss(torch.where(fg > 0, 30.0, -30.0), hv, fg, hv)
    assert float(exact) < 0.01
    assert float(loss(torch.where(fg > 0, 30.0, -30.0), -hv, fg, hv)) > 1  # HV signs swapped: each nucleus inverted
    assert float(loss(torch.zeros_like(fg), hv, fg, hv)) > 0.5  # unsure everywhere


def test_aggregated_jaccard_is_kumars_on_hand_made_objects():
    truth = np.zeros((10, 10), np.int32)
    truth[0:4, 0:4] = 1  # 16 px
    truth[6:10, 6:10] = 2  # 16 px, missed
    pred = np.zeros_like(truth)
    pred[0:4, 0:2] = 5  # 8 px inside nucleus 1
    pred[0:2, 6:8] = 7  # 4 px, a false positive
    # nucleus 1 with 5: 8 / 16; nucleus 2 alone: 0 / 16; the unused prediction adds its 4 px to the union
    assert aggregated_jaccard(pred, truth) == pytest.approx(8 / (16 + 16 + 4))
    assert aggregated_jaccard(truth, truth) == 1.0
    assert aggregated_jaccard(pred, truth, parts=True) == (8.0, 36.0)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(images, tmp_path):
    reference = train_nuclei(images, small_config(), tmp_path / "ref", recipe=TINY, device="cpu")
    assert reference.path is not None and len(reference.history) == 3
    done = []
    stopped = train_nuclei(
        images,
        small_config(),
        tmp_path / "run",
        recipe=TINY,
        device="cpu",
        on_epoch=lambda e: done.append(e.epoch),
        stop=lambda: len(done) >= 2,
    )
    assert stopped.path is None and (tmp_path / "run.training" / "state.pt").exists()
    with pytest.raises(TrainingError, match="--resume"):
        train_nuclei(images, small_config(), tmp_path / "run", recipe=TINY, device="cpu")
    resumed = train_nuclei(images, small_config(), tmp_path / "run", recipe=TINY, device="cpu", resume=True)
    assert [e.epoch for e in resumed.history] == [1, 2, 3]
    np.testing.assert_allclose([e.train_loss for e in resumed.history], [e.train_loss for e in reference.history])
    a, _ = load_checkpoint(reference.path)
    b, config = load_checkpoint(resumed.path)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert config.heads == "hover" and config.provenance["best_epoch"] == resumed.best_epoch
    # the marker threshold is tuned on the validation images, and tuning never lowers their F1
    assert config.post_processing["marker_threshold"] in MARKER_GRID
    tuned = config.provenance["post_processing"]
    assert tuned["val_f1"] >= tuned["val_f1_before"]
    assert load_nuclei_model(str(resumed.path)).hover.marker_threshold == config.post_processing["marker_threshold"]
    assert (resumed.path / "metrics.csv").read_text().splitlines()[0].split(",")[3] == "val_f1"
    assert not (tmp_path / "run.training").exists()


def test_nephro_train_task_nuclei_makes_a_model_nephro_segment_runs(miccai, tmp_path, capsys):
    out = tmp_path / "nuclei-model"
    base = ["train", "--task", "nuclei", "--annotations", str(miccai / "labels"), "--images", str(miccai / "images")]
    base += ["--image-mpp", "0.25"]
    tiny = ["--epochs", "1", "--steps", "1", "--batch", "2", "--crop", "64", "--val-fraction", "0.34"]
    small = ["--encoder", "mobilenet_v2", "--decoder-channels", "32", "16", "16", "8", "8"]
    assert main([*base, *tiny, "--tile", "512", "--out", str(out)]) == 2
    assert "--tile: options of glomerulus training" in capsys.readouterr().err
    assert main([*base, *tiny, *small, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["heads"] == "hover" and config["mpp"] == 0.5 and config["provenance"]["recipe"]["crop"] == 64
    # the folder is a nuclei model wherever a model is named: segment with it as it is
    table = tmp_path / "nuclei.csv"
    image = miccai / "images" / "image14.png"
    assert main(["segment", str(image), "--mpp", "0.25", "--model", str(out), "--out", str(table)]) == 0
    assert table.read_text().splitlines()[0].startswith("id,")
    # and it fine-tunes, the encoder frozen
    tuned = tmp_path / "tuned"
    assert main([*base, *tiny, "--from", str(out), "--freeze-encoder", "--out", str(tuned)]) == 0
    before = load_checkpoint(out)[0].encoder.state_dict()
    after = load_checkpoint(tuned)[0].encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)
    assert json.loads((tuned / "config.json").read_text())["provenance"]["fine_tuned_from"] == str(out)


def test_a_glomerulus_checkpoint_is_not_taken_for_a_nuclei_model(tmp_path, capsys):
    assert main(["model", "init", "--arch", "unet", "--encoder", "mobilenet_v2", "--out", str(tmp_path / "g")]) == 0
    from napari_nephro.models.nuclei import family_of

    assert family_of(str(tmp_path / "g")) is None
    with pytest.raises(TrainingError, match="glomerulus checkpoint"):
        from napari_nephro.pipelines.train_nuclei import starting_network

        starting_network(str(tmp_path / "g"), None, None, None)


def test_cellvit_is_fine_tuned_by_the_same_loop_and_stays_a_cellvit_checkpoint(images, tmp_path):
    from napari_nephro.models import cellvit
    from napari_nephro.pipelines.train_nuclei import starting_network
    from test_cellvit import _save, _tiny_config, _tiny_state

    _, state = _tiny_state()
    source = tmp_path / "tiny.pth"
    _save(source, "CellViT", state, _tiny_config(**{"data.magnification": 20}))  # 0.5 um/px, as the images
    config, network, save = starting_network(f"cellvit:{source}", None, None, None)
    assert config.mpp == 0.5 and config.normalization == {"mean": [0.5] * 3, "std": [0.5] * 3}
    recipe = NucleiRecipe(epochs=1, steps_per_epoch=1, batch_size=2, crop=64, seed=0, val_fraction=0.34)
    out = tmp_path / "tuned.pth"
    with pytest.warns(UserWarning, match="Commons Clause"):
        result = train_nuclei(images, config, out, recipe=recipe, network=network, save=save, device="cpu")
        tuned = cellvit.load(out, device="cpu", tile_size=256)
    assert result.path == out and out.with_suffix(".metrics.csv").exists()
    changed = [k for k, v in tuned.network.state_dict().items() if not torch.equal(v, state[k])]
    assert any(k.startswith("hv_map_decoder") for k in changed)  # the HV branch learnt
    assert not any(
        k.startswith("nuclei_type_maps_decoder") for k in changed if "running" not in k and "num_batches" not in k
    )
    assert os.path.getsize(out) > 0


def test_each_tile_is_contrast_stretched_but_glass_is_not_made_into_noise():
    from napari_nephro.models.errors import ModelError
    from napari_nephro.models.hover_segmenter import MAX_GAIN, stretch_contrast

    torch.manual_seed(0)
    pale = 0.55 + 0.3 * torch.rand(2, 3, 32, 32)  # a hazy scan: everything between 0.55 and 0.85
    out = stretch_contrast(pale, (1, 99))
    for tile in out:
        for channel in tile:
            assert float(channel.quantile(0.01)) == pytest.approx(0, abs=0.02)
            assert float(channel.quantile(0.99)) == pytest.approx(1, abs=0.02)
    glass = 0.95 + 0.01 * torch.rand(1, 3, 32, 32)
    spread = stretch_contrast(glass, (1, 99))
    assert float(spread.max() - spread.min()) <= 0.01 * MAX_GAIN + 1e-6  # at most MAX_GAIN times the noise
    with pytest.raises(ModelError, match="stretch"):
        ModelConfig(
            arch="unet",
            classes=["nucleus"],
            heads="hover",
            normalization={"mean": [0.5] * 3, "std": [0.5] * 3, "stretch": [99, 1]},
        )
    with pytest.raises(ModelError, match="one class"):
        ModelConfig(arch="unet", classes=["a", "b"], heads="hover")


def test_white_padding_past_the_slide_edge_does_not_change_the_stretch():
    from napari_nephro.models.hover_segmenter import stretch_contrast

    torch.manual_seed(1)
    tissue = 0.3 + 0.4 * torch.rand(1, 3, 64, 64)
    padded = torch.ones(1, 3, 128, 128)  # a small image in a tile: three quarters of it white
    padded[..., :64, :64] = tissue
    alone = stretch_contrast(tissue, (1, 99))
    inside = stretch_contrast(padded, (1, 99))[..., :64, :64]
    torch.testing.assert_close(inside, alone)
    assert float(alone.max()) == pytest.approx(1.0, abs=0.02)  # the tissue's brightest, not the padding, is white


def test_tuned_post_processing_in_a_config_is_checked(tmp_path):
    from napari_nephro.models.errors import ModelError

    hover = {"arch": "unet", "classes": ["nucleus"], "heads": "hover"}
    assert ModelConfig(**hover, post_processing={"marker_threshold": 0.55}).post_processing["marker_threshold"] == 0.55
    for bad, words in (
        ({"marker": 0.5}, "unknown post_processing keys marker"),
        ({"sobel_size": 10}, "odd"),
        ({"marker_threshold": 1.5}, r"in \[0.0, 1.0\]"),
        ({"min_size": 2.5}, "whole number"),
        ({"threshold": "high"}, "must be a number"),
    ):
        with pytest.raises(ModelError, match=words):
            ModelConfig(**hover, post_processing=bad)
    with pytest.raises(ModelError, match="hover"):
        ModelConfig(arch="unet", post_processing={"marker_threshold": 0.5})
