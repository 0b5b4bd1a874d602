"""The U-Net family built from small configs: forward at the tile sizes used, checkpoints, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_nephro.cli import main
from napari_nephro.models import (
    ModelConfig,
    ModelError,
    TorchSegmenter,
    build_network,
    load_checkpoint,
    pick_device,
    save_checkpoint,
)
from napari_nephro.models.unet3plus import UNet3Plus

SMALL = {
    "unet": {"encoder": "resnet18"},
    "unet3plus": {"encoder": "resnet18", "decoder": {"cat_channels": 8}},
    "swin_unet": {"encoder_kwargs": {"embed_dim": 24, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]}},
}
CLASSES = ["normal", "segmental sclerosis", "global sclerosis"]


def small_config(arch: str, classes=("glomerulus",), input_size: int = 320) -> ModelConfig:
    return ModelConfig(arch=arch, classes=list(classes), input_size=input_size, **SMALL[arch])


@pytest.mark.parametrize("arch", ["unet", "unet3plus", "swin_unet"])
@pytest.mark.parametrize("classes", [("glomerulus",), CLASSES])
def test_each_architecture_runs_at_the_paper_input_size(arch, classes):
    torch.manual_seed(0)
    config = small_config(arch, classes)
    network = build_network(config).eval()
    with torch.no_grad():
        out = network(torch.rand(2, 3, 320, 320))
    assert out.shape == (2, 1 if len(classes) == 1 else 4, 320, 320)
    assert torch.isfinite(out).all()


def test_unet3plus_has_full_scale_skips_and_deep_supervision():
    network = UNet3Plus("resnet18", classes=2, cat_channels=8, deep_supervision=True)
    # every decoder stage takes one branch per scale: 5 encoder levels below the image
    assert all(len(stage.branches) == 5 for stage in network.stages) and len(network.stages) == 4
    network.train()
    outputs = network(torch.rand(1, 3, 128, 128))
    assert len(outputs) == 5 and all(o.shape == (1, 2, 128, 128) for o in outputs)
    network.eval()
    with torch.no_grad():
        assert network(torch.rand(1, 3, 96, 160)).shape == (1, 2, 96, 160)  # not square, not a power of two


@pytest.mark.parametrize("arch", ["unet", "unet3plus", "swin_unet"])
def test_checkpoint_round_trip_gives_identical_outputs(arch, tmp_path):
    torch.manual_seed(1)
    config = small_config(arch, CLASSES, input_size=160 if arch != "swin_unet" else 224)
    network = build_network(config).eval()
    folder = save_checkpoint(network, config, tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded, loaded_config = load_checkpoint(folder)
    assert loaded_config == config
    x = torch.rand(1, 3, config.input_size, config.input_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), network(x), rtol=0, atol=0)


def test_segmenter_gives_probabilities_at_tile_size(tmp_path):
    config = small_config("unet", CLASSES, input_size=64)
    config.tile_size, config.overlap = 256, 64
    save_checkpoint(build_network(config), config, tmp_path / "ckpt")
    segmenter = TorchSegmenter.from_checkpoint(tmp_path / "ckpt", device="cpu")
    assert segmenter.kind == "semantic" and segmenter.classes == CLASSES and segmenter.tile_size == 256
    tiles = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    probs = segmenter.predict(tiles)
    assert probs.shape == (3, 4, 256, 256) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)  # softmax over background + 3 classes


def test_flips_average_the_tile_and_its_three_mirror_images(tmp_path):
    """`flips` in config.json: the prediction is the mean over the four flips, each flipped back."""
    torch.manual_seed(0)
    config = small_config("unet", input_size=64)
    config.tile_size, config.overlap = 64, 0
    network = build_network(config).eval()
    save_checkpoint(network, config, tmp_path / "plain")
    config.flips = True
    save_checkpoint(network, config, tmp_path / "flips")
    assert json.loads((tmp_path / "flips" / "config.json").read_text())["flips"] is True
    assert "flips" not in json.loads((tmp_path / "plain" / "config.json").read_text())  # older readers still read it
    plain = TorchSegmenter.from_checkpoint(tmp_path / "plain", device="cpu")
    flips = TorchSegmenter.from_checkpoint(tmp_path / "flips", device="cpu")
    tiles = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    views = [(), (1,), (2,), (1, 2)]  # axes of (N, H, W, 3) tiles; the output is (N, C, H, W)
    expected = np.mean(
        [np.flip(plain.predict(np.ascontiguousarray(np.flip(tiles, a))), tuple(x + 1 for x in a)) for a in views],
        axis=0,
    )
    np.testing.assert_allclose(flips.predict(tiles), expected, atol=1e-5)
    assert not np.allclose(flips.predict(tiles), plain.predict(tiles), atol=1e-3)  # it did change something
    with pytest.raises(ModelError, match="flips must be true or false"):
        ModelConfig(arch="unet", flips="yes")


def test_model_init_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "fresh"
    assert (
        main(["model", "init", "--arch", "unet", "--out", str(out), "--encoder", "resnet18", "--classes", *CLASSES])
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "unet" and config["classes"] == CLASSES and config["input_size"] == 320
    assert config["tile_size"] == 1024 and config["overlap"] == 256 and "random" in config["provenance"]["weights"]
    network, _ = load_checkpoint(out)
    assert sum(p.numel() for p in network.parameters()) > 1e6
    assert main(["model", "init", "--arch", "unet", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def _broken(folder, what):
    if what == "no weights":
        (folder / "model.safetensors").unlink()
    elif what == "bad json":
        (folder / "config.json").write_text("{arch")
    elif what == "other arch":
        config = json.loads((folder / "config.json").read_text())
        config.update(arch="unet3plus", decoder={"cat_channels": 8})
        (folder / "config.json").write_text(json.dumps(config))
    elif what == "unknown arch":
        config = json.loads((folder / "config.json").read_text())
        config["arch"] = "segformer"
        (folder / "config.json").write_text(json.dumps(config))
    elif what == "not safetensors":
        (folder / "model.safetensors").write_bytes(b"PK\x03\x04 a pickle in disguise")
    elif what == "config is a folder":
        (folder / "config.json").unlink()
        (folder / "config.json").mkdir()


@pytest.mark.parametrize(
    ("what", "reason"),
    [
        ("no weights", "no model.safetensors"),
        ("bad json", "not valid JSON"),
        ("other arch", "do not fit a unet3plus"),
        ("unknown arch", "unknown architecture 'segformer'"),
        ("not safetensors", "not a readable safetensors file"),
        ("config is a folder", "config.json: cannot be read"),
    ],
)
def test_a_wrong_checkpoint_folder_is_one_line(tmp_path, what, reason):
    config = small_config("unet")
    folder = save_checkpoint(build_network(config), config, tmp_path / "ckpt")
    _broken(folder, what)
    with pytest.raises(ModelError, match=reason) as err:
        load_checkpoint(folder)
    assert "\n" not in str(err.value)


def test_asking_for_a_gpu_this_machine_lacks_is_refused():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no usable NVIDIA GPU"):
            pick_device("cuda")
    with pytest.raises(ModelError, match="unknown device"):
        pick_device("tpu")
