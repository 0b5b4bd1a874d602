"""Training and fine-tuning on real annotated tiles: the loss falls, checkpoints load, runs resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require_shared
from napari_nephro.cli import main
from napari_nephro.inference import segment_region
from napari_nephro.io import open_slide
from napari_nephro.models import ModelConfig, TorchSegmenter
from napari_nephro.pipelines.export import load_items
from napari_nephro.training import Recipe, TrainingError, cut_tiles, split_by_group, train
from napari_nephro.training.augment import Augment, jitter_stains

SMALL = {"encoder": "mobilenet_v2", "decoder": {"decoder_channels": [32, 16, 16, 8, 8]}}
GEOMETRY = {"mpp": 1.0, "tile_size": 512, "overlap": 0, "input_size": 64}


@pytest.fixture(scope="module")
def aidpath_subset(tmp_path_factory):
    """Five AIDPATH PAS tiles and their masks, linked into folders of their own."""
    source = require_shared("glomeruli", "aidpath_pas")
    root = tmp_path_factory.mktemp("aidpath")
    for part in ("images", "masks"):
        (root / part).mkdir()
    for name in sorted(os.listdir(source / "images"))[:5]:
        for part in ("images", "masks"):
            (root / part / name).symlink_to(source / part / name)
    return root


@pytest.fixture(scope="module")
def tiles(aidpath_subset):
    items = load_items(aidpath_subset / "masks", slide=aidpath_subset / "images")
    return cut_tiles(items, classes=["glomerulus"], mpp=1.0, tile=512, overlap=0, input_size=64, image_mpp=0.5)


def small_config(**changes) -> ModelConfig:
    return ModelConfig(arch="unet", **{**SMALL, **GEOMETRY, **changes})


def test_tiles_are_cut_at_the_model_scale_with_their_masks(tiles):
    assert tiles.images.shape == (len(tiles), 64, 64, 3) and tiles.masks.shape == (len(tiles), 64, 64)
    assert len(tiles) == 5  # each 1024 px image at 0.5 um/px is one 512 px tile at 1 um/px
    assert 0 < tiles.class_pixels()["glomerulus"] < tiles.masks.size / 2
    # the mask sits on the glomerulus: pale Bowman space and tuft differ from the tissue around them
    assert set(np.unique(tiles.masks)) == {0, 1}


def test_the_split_keeps_each_image_on_one_side(tiles):
    train_index, val_index = split_by_group(tiles.groups * 3, 0.4, seed=1)
    groups = np.array(tiles.groups * 3)
    assert not set(groups[train_index]) & set(groups[val_index])
    assert len(set(groups[val_index])) == 2
    with pytest.raises(TrainingError, match="at least two images"):
        split_by_group(["a", "a"], 0.2, seed=0)


def test_a_few_steps_lower_the_loss(tiles, tmp_path):
    torch.manual_seed(0)
    recipe = Recipe(epochs=4, batch_size=4, lr=3e-3, warmup_epochs=0.5, augment=False, val_fraction=0.2)
    result = train(tiles, small_config(), tmp_path / "ckpt", recipe=recipe, device="cpu")
    losses = [e.train_loss for e in result.history]
    assert losses[-1] < losses[0], losses
    assert result.path is not None and 1 <= result.best_epoch <= 4


def test_a_trained_checkpoint_loads_segments_and_says_how_it_was_made(aidpath_subset, tmp_path, capsys):
    out = tmp_path / "ckpt"
    args = ["train", "--annotations", str(aidpath_subset / "masks"), "--images", str(aidpath_subset / "images")]
    args += ["--image-mpp", "0.5", "--tile", "512", "--overlap", "0", "--input", "64", "--encoder", "mobilenet_v2"]
    args += ["--decoder-channels", "32", "16", "16", "8", "8", "--epochs", "1", "--batch", "4", "--device", "cpu"]
    args += ["--out", str(out), "--attribution", "AIDPATH (CC BY 4.0)"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert str(out) in printed.out
    assert len(printed.err.splitlines()) == 1, printed.err  # one line per epoch: no bar redraws off a terminal
    config = json.loads((out / "config.json").read_text())
    made = config["provenance"]
    assert made["recipe"]["epochs"] == 1 and made["best_epoch"] == 1 and len(made["history"]) == 1
    assert made["data_attribution"] == "AIDPATH (CC BY 4.0)" and len(made["data"]["items"]) == 5
    assert (out / "metrics.csv").read_text().startswith("epoch,train_loss,val_loss,val_dice")
    assert not (tmp_path / "ckpt.training").exists()
    segmenter = TorchSegmenter.from_checkpoint(out, device="cpu")
    image = sorted((aidpath_subset / "images").iterdir())[0]
    result = segment_region(open_slide(image, mpp=0.5), segmenter)
    assert result.array.shape == (1024, 1024) and result.stats.complete

    # fine-tuning starts from it, encoder frozen, and keeps its classes and geometry
    tuned = tmp_path / "tuned"
    base = [*args[: args.index("--image-mpp")], "--image-mpp", "0.5"]
    assert (
        main([*base, "--from", str(out), "--freeze-encoder", "--epochs", "1", "--batch", "4", "--out", str(tuned)]) == 0
    )
    tuned_config = json.loads((tuned / "config.json").read_text())
    assert tuned_config["input_size"] == 64 and tuned_config["provenance"]["started_from"] == str(out)
    assert tuned_config["provenance"]["recipe"]["freeze_encoder"] is True
    before = TorchSegmenter.from_checkpoint(out).network.encoder.state_dict()
    after = TorchSegmenter.from_checkpoint(tuned).network.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)


def test_an_interrupted_run_resumes_where_it_stopped_and_ends_the_same(tiles, tmp_path):
    recipe = Recipe(epochs=3, batch_size=4, lr=1e-3, seed=3)
    reference = train(tiles, small_config(), tmp_path / "ref", recipe=recipe, device="cpu")

    epochs_done = []
    stopped = train(
        tiles,
        small_config(),
        tmp_path / "run",
        recipe=recipe,
        device="cpu",
        on_epoch=lambda e: epochs_done.append(e.epoch),
        stop=lambda: len(epochs_done) >= 2,
    )
    assert stopped.path is None and len(stopped.history) == 2
    assert (tmp_path / "run.training" / "state.pt").exists()
    with pytest.raises(TrainingError, match="--resume"):
        train(tiles, small_config(), tmp_path / "run", recipe=recipe, device="cpu")
    with pytest.raises(TrainingError, match="different lr"):
        train(
            tiles, small_config(), tmp_path / "run", recipe=Recipe(epochs=3, batch_size=4, lr=2e-3, seed=3), resume=True
        )
    fewer = tiles.subset(range(len(tiles) - 1))  # other tiles: another schedule and sampler, a mixed run
    with pytest.raises(TrainingError, match="was started on"):
        train(fewer, small_config(), tmp_path / "run", recipe=recipe, device="cpu", resume=True)
    resumed = train(tiles, small_config(), tmp_path / "run", recipe=recipe, device="cpu", resume=True)
    assert [e.epoch for e in resumed.history] == [1, 2, 3]
    np.testing.assert_allclose(
        [e.val_dice for e in resumed.history], [e.val_dice for e in reference.history], atol=1e-6
    )
    a = TorchSegmenter.from_checkpoint(reference.path).network.state_dict()
    b = TorchSegmenter.from_checkpoint(resumed.path).network.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_augmentations_move_image_and_mask_together():
    torch.manual_seed(0)
    yy, xx = np.mgrid[:96, :96]
    mask = ((yy - 40) ** 2 / 900 + (xx - 55) ** 2 / 300 <= 1) | ((yy > 70) & (xx < 30))  # no symmetry to hide a slip
    image = np.repeat(np.where(mask, 20, 235).astype(np.uint8)[..., None], 3, axis=2)  # dark object on white glass
    augment = Augment()
    for _ in range(30):
        out_image, out_mask = augment(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask.astype(np.uint8)))
        assert out_image.shape == (3, 96, 96) and out_image.dtype == torch.float32 and out_mask.dtype == torch.int64
        dark = out_image.mean(0) < 0.5
        assert (dark == (out_mask == 1)).float().mean() > 0.97
    assert not torch.equal(out_mask, torch.from_numpy(mask.astype(np.int64)))  # it did move


def test_stain_jitter_changes_the_dyes_not_the_tissue_or_the_glass():
    """HED jitter recolours a real PAS tile as another lab's stain would: same structures, glass left white."""
    source = require_shared("glomeruli", "aidpath_pas")
    tile = np.array(Image.open(source / "images" / "10150.png").convert("RGB"))[:256, :256].copy()
    tile[:16, :16] = 255  # a patch of glass
    image = torch.from_numpy(tile).permute(2, 0, 1)
    assert torch.equal(jitter_stains(image, 0.0), image)  # no jitter: the exact pixels back
    torch.manual_seed(0)
    outs = [jitter_stains(image, 0.3) for _ in range(8)]
    for out in outs:
        assert out.shape == image.shape and out.dtype == torch.uint8
        assert torch.equal(out[:, :16, :16], image[:, :16, :16])
        grey_in, grey_out = image.float().mean(0).flatten(), out.float().mean(0).flatten()
        assert torch.corrcoef(torch.stack([grey_in, grey_out]))[0, 1] > 0.9  # structures stay where they were
    changes = [float((o.float() - image.float()).abs().mean()) for o in outs]
    assert min(changes) > 0.5 and max(changes) > 4  # every draw recolours, some strongly
    torch.manual_seed(0)
    assert all(torch.equal(a, jitter_stains(image, 0.3)) for a in outs[:1])  # seeded: repeatable


def test_absurd_jitter_is_refused(tmp_path, capsys):
    with pytest.raises(TrainingError, match="stain jitter"):
        Recipe(stain_jitter=2.0).check()
    with pytest.raises(TrainingError, match="scale jitter"):
        Recipe(scale_jitter=-0.1).check()
    assert (
        main(
            [
                "train",
                "--annotations",
                str(tmp_path),
                "--images",
                str(tmp_path),
                "--out",
                str(tmp_path / "m"),
                "--scale-jitter",
                "nan",
            ]
        )
        == 2
    )
    assert "scale-jitter" in capsys.readouterr().err


def test_bad_training_input_is_refused_before_training(aidpath_subset, tmp_path, capsys):
    bupt = require_shared("glomeruli", "bupt_multistain_dev")
    base = ["train", "--out", str(tmp_path / "x"), "--epochs", "1", "--device", "cpu"]
    several = ["--classes", "normal", "global sclerosis"]
    cases = [
        (
            ["--annotations", str(bupt / "annotations.json"), "--images", str(bupt / "images"), *several],
            "gl, gm, gn, gs are not among the model's classes",
        ),
        (
            [
                "--annotations",
                str(bupt / "annotations.json"),
                "--images",
                str(bupt / "images"),
                *several,
                "--map",
                "gn=sclerosis",
            ],
            "not among the classes",
        ),
        (["--annotations", str(aidpath_subset / "masks"), "--images", str(aidpath_subset / "images")], "--image-mpp"),
    ]
    empty = tmp_path / "empty"
    (empty / "masks").mkdir(parents=True)
    (empty / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(empty / "masks" / name)
        Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(empty / "images" / name)
    cases.append(
        (["--annotations", str(empty / "masks"), "--images", str(empty / "images"), "--image-mpp", "1"], "no object")
    )
    small = tmp_path / "small"
    (small / "masks").mkdir(parents=True)
    (small / "images").mkdir()
    Image.fromarray(np.pad(np.ones((8, 8), np.uint8), 4)).save(small / "masks" / "a.png")
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(small / "images" / "a.png")
    cases.append(
        (["--annotations", str(small / "masks"), "--images", str(small / "images")], "16x16 image but a.png is 20x20")
    )
    fresh = tmp_path / "u3"
    assert main(["model", "init", "--arch", "unet3plus", "--out", str(fresh), "--encoder", "resnet18"]) == 0
    capsys.readouterr()
    cases.append(
        (
            [
                "--annotations",
                str(aidpath_subset / "masks"),
                "--images",
                str(aidpath_subset / "images"),
                "--from",
                str(fresh),
                "--arch",
                "unet",
            ],
            "is a unet3plus",
        )
    )
    aidpath = ["--annotations", str(aidpath_subset / "masks"), "--images", str(aidpath_subset / "images")]
    cases.append(([*aidpath, "--image-mpp", "0.5", "--input", "100"], "multiple of 32"))
    cases.append(([*aidpath, "--image-mpp", "0.5", "--tile", "0"], "tile_size must be positive"))
    for args, reason in cases:
        assert main([*base, *args]) == 2, args
        err = capsys.readouterr().err
        assert reason in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.training").exists()


def test_oversampling_weighs_the_tiles_that_hold_a_class(tiles):
    from napari_nephro.training.data import sample_weights

    weights = sample_weights(tiles, {"glomerulus": 3.0})
    holds = (tiles.masks == 1).any(axis=(1, 2))
    assert holds.any() and np.all(weights[holds] == 3) and np.all(weights[~holds] == 1)
    with pytest.raises(TrainingError, match="not one of the classes"):
        sample_weights(tiles, {"sclerosis": 2.0})
    with pytest.raises(TrainingError, match="positive"):
        sample_weights(tiles, {"glomerulus": 0.0})
