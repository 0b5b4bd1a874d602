"""Hardening of training and model loading: diverged runs, pickles, damaged files, absurd sizes.

Every case is either correct behaviour or one line (`nephro: error: ...`, exit 2)
that leaves nothing behind. Tiny synthetic data and tiny networks: seconds each.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import tiny_seggpt
from napari_nephro.cli import main
from napari_nephro.models import ModelConfig, ModelError, build_network, load_checkpoint, save_checkpoint
from napari_nephro.models.seggpt import load_seggpt
from napari_nephro.prompts import Example, PromptSet
from napari_nephro.training import Recipe, TileSet, TrainingError, train

TINY = {
    "arch": "unet",
    "encoder": "mobilenet_v2",
    "decoder": {"decoder_channels": [16, 8, 8, 8, 8]},
    "mpp": 1.0,
    "tile_size": 64,
    "overlap": 0,
    "input_size": 32,
}
TINY_ARGS = ["--encoder", "mobilenet_v2", "--decoder-channels", "16", "8", "8", "8", "8"]
TINY_ARGS += ["--image-mpp", "1", "--tile", "64", "--overlap", "0", "--input", "32", "--no-augment"]
TINY_ARGS += ["--batch", "2", "--device", "cpu"]


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes})


def tiny_tiles(n: int = 6, seed: int = 0) -> TileSet:
    """Dark squares on noisy pink, three source images (one for validation)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(150, 255, (n, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((n, 32, 32), np.uint8)
    for i in range(n):
        y, x = rng.integers(2, 16, 2)
        masks[i, y : y + 12, x : x + 12] = 1
        images[i][masks[i] == 1] = 40
    return TileSet(images, masks, [f"image{i % 3}" for i in range(n)], ["glomerulus"], np.ones(n))


@pytest.fixture
def tiny_dataset(tmp_path):
    """Three 64 px images with a dark disc each and their masks: a training set for the CLI."""
    root = tmp_path / "data"
    for part in ("images", "masks"):
        (root / part).mkdir(parents=True)
    yy, xx = np.mgrid[:64, :64]
    for i in range(3):
        mask = ((yy - 20 - 8 * i) ** 2 + (xx - 30) ** 2 < 100).astype(np.uint8)
        image = np.full((64, 64, 3), 220, np.uint8)
        image[mask == 1] = (90, 40, 120)
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    return root


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def one_error_line(capsys, *expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nephro: error:"), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def nonfinite(state: dict) -> int:
    return sum(1 for v in state.values() if v.is_floating_point() and not torch.isfinite(v).all())


# 1. diverged runs ------------------------------------------------------------------------------------


def test_a_huge_learning_rate_stops_with_one_line_and_leaves_nothing(tiny_dataset, tmp_path, capsys):
    before = listing(tmp_path)
    data = ["--annotations", str(tiny_dataset / "masks"), "--images", str(tiny_dataset / "images")]
    out = tmp_path / "ckpt"
    assert main(["train", *data, *TINY_ARGS, "--epochs", "2", "--lr", "1e6", "--out", str(out)]) == 2
    line = one_error_line(capsys, "training diverged at epoch 1", "lower --lr (it was 1e+06)")
    assert "--overwrite" not in line  # nothing was kept, so nothing to overwrite
    assert listing(tmp_path) == before  # no checkpoint, no .training folder, no temporary file


def test_a_run_that_diverges_later_keeps_its_finite_epochs_resumable(tmp_path):
    tiles, config = tiny_tiles(), tiny_config()
    recipe = Recipe(epochs=2, batch_size=2, lr=1e-3, augment=False)
    network = build_network(config)

    def poison(epoch) -> None:  # what a huge step does to a weight, after epoch 1 was saved
        if epoch.epoch == 1:
            with torch.no_grad():
                next(network.parameters()).view(-1)[0] = float("nan")

    with pytest.raises(TrainingError) as err:
        train(tiles, config, tmp_path / "ckpt", recipe=recipe, network=network, device="cpu", on_epoch=poison)
    message = str(err.value)
    assert "\n" not in message and "epoch 2, step 1" in message and "lower --lr" in message
    assert "--overwrite" in message and "ckpt.training" in message
    assert not (tmp_path / "ckpt").exists()
    state_dir = tmp_path / "ckpt.training"
    for name in ("last.safetensors", "best.safetensors"):  # epoch 1, as it was saved: finite
        assert nonfinite(load_file(str(state_dir / name))) == 0
    assert (state_dir / "metrics.csv").read_text().count("\n") == 2  # header + epoch 1

    # the kept epochs are a real resumable state: the run finishes from epoch 2 with finite weights
    result = train(tiles, config, tmp_path / "ckpt", recipe=recipe, device="cpu", resume=True)
    assert [e.epoch for e in result.history] == [1, 2] and result.path is not None
    network, _ = load_checkpoint(result.path)
    assert nonfinite(network.state_dict()) == 0
    assert not state_dir.exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    config = tiny_config()
    network = build_network(config)
    with torch.no_grad():
        next(network.parameters()).fill_(float("inf"))
    with pytest.raises(ModelError, match=r"1 of .* weight tensors hold NaN or infinite values"):
        save_checkpoint(network, config, tmp_path / "ckpt")
    big = build_network(config)
    with torch.no_grad():
        next(big.parameters()).fill_(1e6)  # finite in float32, infinite in float16
    with pytest.raises(ModelError, match="overflow float16: save without half precision"):
        save_checkpoint(big, config, tmp_path / "ckpt", half=True)
    assert listing(tmp_path) == set()


def poisoned_checkpoint(folder: Path, count: int = 2) -> Path:
    config = tiny_config()
    save_checkpoint(build_network(config), config, folder)
    state = load_file(str(folder / "model.safetensors"))
    for key in [k for k, v in state.items() if v.is_floating_point()][:count]:
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
    save_file(state, str(folder / "model.safetensors"))
    return folder


def test_a_checkpoint_holding_nan_is_refused_by_name_and_count(tmp_path, capsys):
    folder = poisoned_checkpoint(tmp_path / "poisoned")
    with pytest.raises(ModelError, match=r"model\.safetensors: 2 of \d+ tensors hold NaN or infinite values") as err:
        load_checkpoint(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)

    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "slide.png")
    out = tmp_path / "labels.zarr"
    args = ["segment", str(tmp_path / "slide.png"), "--mpp", "1", "--model", str(folder), "--out", str(out)]
    assert main([*args, "--device", "cpu"]) == 2
    one_error_line(capsys, "2 of", "NaN or infinite", "lower --lr")
    assert not out.exists() and listing(tmp_path) == {
        "poisoned",
        "poisoned/config.json",
        "poisoned/model.safetensors",
        "slide.png",
    }


# 2. SegGPT weights: safetensors only ------------------------------------------------------------------


class _Touch:
    """Unpickling this creates a file: proof of whether a pickle was loaded (and harmless otherwise)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": _Touch(marker)}))


@pytest.fixture(scope="module")
def seggpt_download(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seggpt") / "seggpt-vit-large"
    tiny_seggpt(folder)
    return folder


def test_seggpt_weights_load_from_safetensors_only(seggpt_download, tmp_path):
    marker = tmp_path / "unpickled"
    both = tmp_path / "both"
    shutil.copytree(seggpt_download, both)
    write_pickle(both / "pytorch_model.bin", marker)
    model, _ = load_seggpt(both)  # the safetensors beside it are used; the pickle is never opened
    assert model.config.hidden_size == 32 and not marker.exists()

    only_pickle = tmp_path / "only-pickle"
    shutil.copytree(seggpt_download, only_pickle)
    (only_pickle / "model.safetensors").unlink()
    write_pickle(only_pickle / "pytorch_model.bin", marker)
    with pytest.raises(ModelError, match=r"pytorch_model\.bin .*pickled.*convert it to model.safetensors") as err:
        load_seggpt(only_pickle)
    assert "download model.safetensors of BAAI/seggpt-vit-large" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_seggpt_with_only_a_pickle_is_one_line_in_the_cli(seggpt_download, tmp_path, capsys):
    marker = tmp_path / "unpickled"
    folder = tmp_path / "weights"
    shutil.copytree(seggpt_download, folder)
    (folder / "model.safetensors").unlink()
    write_pickle(folder / "pytorch_model.bin", marker)
    prompts = PromptSet(["glomerulus"], mpp=1.0, size=48)
    mask = np.zeros((48, 48), np.uint8)
    mask[10:30, 10:30] = 1
    prompts.add(Example(np.full((48, 48, 3), 128, np.uint8), mask, "glomerulus", "synthetic", (0.0, 0.0, 48, 48)))
    prompts.save(tmp_path / "prompts")
    Image.fromarray(np.full((96, 96, 3), 200, np.uint8)).save(tmp_path / "slide.png")
    out = tmp_path / "x.zarr"
    args = ["segment", str(tmp_path / "slide.png"), "--mpp", "1", "--model", f"seggpt:{folder}"]
    assert main([*args, "--prompts", str(tmp_path / "prompts"), "--out", str(out), "--device", "cpu"]) == 2
    one_error_line(capsys, "pytorch_model.bin", "model.safetensors")
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize(
    ("file", "damage"),
    [
        ("model.safetensors", "truncated"),
        ("model.safetensors", "garbage"),
        ("model.safetensors", "empty"),
        ("config.json", "bad json"),
        ("config.json", "deep json"),
        ("config.json", "wrong types"),
        ("preprocessor_config.json", "bad json"),
        ("preprocessor_config.json", "deep json"),
    ],
)
def test_damaged_seggpt_files_are_one_line(seggpt_download, tmp_path, file, damage):
    folder = tmp_path / "seggpt"
    shutil.copytree(seggpt_download, folder)
    path = folder / file
    data = path.read_bytes()
    if damage == "wrong types":
        path.write_text(json.dumps({**json.loads(data), "hidden_size": "large"}))
    else:
        path.write_bytes(
            {
                "truncated": data[: len(data) // 2],
                "garbage": os.urandom(4096),
                "empty": b"",
                "bad json": b"{not json",
                "deep json": b"[" * 200_000 + b"]" * 200_000,
            }[damage]
        )
    with pytest.raises(ModelError) as err:
        load_seggpt(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    assert file in str(err.value) or file == "config.json"  # says which file, where it can


# 3. state.pt of an interrupted run, and our own checkpoint files --------------------------------------

STATE_RECIPE = Recipe(epochs=2, batch_size=2, lr=1e-3, augment=False)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after epoch 1 of 2: `<out>.training` holds a real state."""
    root = tmp_path_factory.mktemp("stopped")
    done = []
    result = train(
        tiny_tiles(),
        tiny_config(),
        root / "ckpt",
        recipe=STATE_RECIPE,
        device="cpu",
        on_epoch=lambda e: done.append(e),
        stop=lambda: len(done) >= 1,
    )
    assert result.path is None and (root / "ckpt.training" / "state.pt").exists()
    return root / "ckpt.training"


@pytest.fixture
def interrupted(stopped_run, tmp_path):
    """A fresh copy of the stopped run's state folder; the checkpoint it would write."""
    shutil.copytree(stopped_run, tmp_path / "ckpt.training")
    return tmp_path / "ckpt"


def _edited(change):
    def make(good: bytes, work: Path, marker: Path) -> bytes:
        (work / "in.pt").write_bytes(good)
        state = torch.load(work / "in.pt", weights_only=True)
        change(state)
        torch.save(state, work / "out.pt")
        return (work / "out.pt").read_bytes()

    return make


def _saved(obj_of_marker):
    def make(good: bytes, work: Path, marker: Path) -> bytes:
        torch.save(obj_of_marker(marker), work / "out.pt")
        return (work / "out.pt").read_bytes()

    return make


def _replace_moment(state) -> None:
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)  # does not fit its parameter


HOSTILE_STATES = {
    "truncated": lambda good, work, marker: good[: len(good) // 2],
    "garbage": lambda good, work, marker: os.urandom(2000),
    "garbage text": lambda good, work, marker: b"hello, this is not a pickle" * 20,
    "empty": lambda good, work, marker: b"",
    "plain pickle": lambda good, work, marker: pickle.dumps({"weight": _Touch(marker)}),
    "zip pickle": _saved(lambda marker: {"epoch": 1, "trap": _Touch(marker)}),  # torch's own format
    "wrong layout": _saved(lambda marker: {"epoch": 1, "optimizer": [], "best": "x"}),  # allowed types only
    "wrong shapes": _edited(_replace_moment),
    "wrong scheduler": _edited(lambda state: state["scheduler"].update(last_epoch="late")),
    "scheduler method": _edited(lambda state: state["scheduler"].update(step=5)),  # would replace .step()
    "wrong betas": _edited(lambda state: state["optimizer"]["param_groups"][0].update(betas="x")),
    "wrong group": _edited(lambda state: state["optimizer"].update(param_groups=[3])),
    "nan moments": _edited(lambda state: state["optimizer"]["state"][0]["exp_avg"].fill_(float("nan"))),
    "wrong step": _edited(lambda state: state["optimizer"]["state"][0].update(step="one")),
    "wrong rng": _edited(lambda state: state.update(torch_rng=torch.zeros(3, dtype=torch.uint8))),
    "future epoch": _edited(lambda state: state.update(epoch=7)),
}


@pytest.mark.parametrize("damage", list(HOSTILE_STATES))
def test_a_hostile_or_damaged_state_is_one_line_on_resume(interrupted, tmp_path, damage):
    state_dir = interrupted.with_name("ckpt.training")
    marker, work = tmp_path / "unpickled", tmp_path / "work"
    work.mkdir()
    good = (state_dir / "state.pt").read_bytes()
    (state_dir / "state.pt").write_bytes(HOSTILE_STATES[damage](good, work, marker))
    with pytest.raises(TrainingError, match=r"state\.pt: damaged, or not written by napari-nephro") as err:
        train(tiny_tiles(), tiny_config(), interrupted, recipe=STATE_RECIPE, device="cpu", resume=True)
    assert "\n" not in str(err.value) and "--overwrite" in str(err.value)
    assert not marker.exists() and not interrupted.exists()


def test_the_real_state_still_resumes(interrupted):
    result = train(tiny_tiles(), tiny_config(), interrupted, recipe=STATE_RECIPE, device="cpu", resume=True)
    assert result.path == interrupted and [e.epoch for e in result.history] == [1, 2]
    assert not interrupted.with_name("ckpt.training").exists()


@pytest.mark.parametrize(
    ("file", "damage"),
    [
        ("recipe.json", b"{oops"),
        ("recipe.json", b"[" * 200_000 + b"]" * 200_000),
        ("recipe.json", b"[1, 2]"),
        ("metrics.csv", b"epoch,train_loss\n1,x\n"),
        ("metrics.csv", b"epoch,train_loss,val_loss,val_dice,lr,seconds\n"),  # an epoch short
        ("last.safetensors", b"garbage"),
        ("best.safetensors", b""),
    ],
)
def test_other_damaged_state_files_are_one_line(interrupted, file, damage):
    state_dir = interrupted.with_name("ckpt.training")
    (state_dir / file).write_bytes(damage)
    with pytest.raises(TrainingError, match=f"{file}: damaged") as err:
        train(tiny_tiles(), tiny_config(), interrupted, recipe=STATE_RECIPE, device="cpu", resume=True)
    assert "\n" not in str(err.value)


def test_a_state_with_nan_weights_is_not_resumed(interrupted):
    state_dir = interrupted.with_name("ckpt.training")
    state = load_file(str(state_dir / "last.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(state_dir / "last.safetensors"))
    with pytest.raises(TrainingError, match=r"last\.safetensors: damaged.*1 of \d+ tensors hold NaN"):
        train(tiny_tiles(), tiny_config(), interrupted, recipe=STATE_RECIPE, device="cpu", resume=True)


def test_a_damaged_state_through_the_cli_is_one_line(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "ckpt"
    state_dir = tmp_path / "ckpt.training"
    state_dir.mkdir()
    recipe = Recipe(epochs=2, batch_size=2, augment=False)  # what the command line below asks for
    (state_dir / "recipe.json").write_text(json.dumps(asdict(recipe)))
    (state_dir / "state.pt").write_bytes(b"\x80\x04 not a state at all")
    data = ["--annotations", str(tiny_dataset / "masks"), "--images", str(tiny_dataset / "images")]
    assert main(["train", *data, *TINY_ARGS, "--epochs", "2", "--out", str(out), "--resume"]) == 2
    one_error_line(capsys, "state.pt: damaged", "--overwrite")
    assert not out.exists()


def test_only_weights_only_torch_load_in_the_package():
    import ast

    import napari_nephro

    loads, pickles = [], []
    for path in Path(napari_nephro.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            options = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            if owner == "torch" and node.func.attr == "load":
                loads.append((path.name, options.get("weights_only")))
            if owner in ("pickle", "dill", "joblib") and node.func.attr in ("load", "loads"):
                pickles.append(path.name)
            if owner == "np" and node.func.attr == "load" and options.get("allow_pickle"):
                pickles.append(path.name)
    assert loads and all(weights_only is True for _, weights_only in loads), loads
    assert not pickles, pickles


@pytest.mark.parametrize(
    ("file", "damage", "reason"),
    [
        ("model.safetensors", "truncated", "not a readable safetensors file"),
        ("model.safetensors", "garbage", "not a readable safetensors file"),
        ("model.safetensors", "empty", "not a readable safetensors file"),
        ("config.json", "bad json", "not valid JSON"),
        ("config.json", "deep json", "nested more than 64 levels deep"),
        ("config.json", {"provenance": json.loads("[" * 600 + "]" * 600)}, "nested more than 64 levels deep"),
        ("config.json", "binary", "not valid JSON"),
        ("config.json", {"tile_size": "big"}, "tile_size must be a whole number"),
        ("config.json", {"tile_size": 512.5}, "tile_size must be a whole number"),
        ("config.json", {"input_size": True}, "input_size must be a whole number"),
        ("config.json", {"classes": 5}, "classes must be distinct names"),
        ("config.json", {"classes": [1, 2]}, "classes must be distinct names"),
        ("config.json", {"mpp": "1"}, "mpp must be positive"),
        ("config.json", {"mpp": None}, "mpp must be positive"),
        ("config.json", {"encoder": 5}, "encoder must be a name"),
        ("config.json", {"arch": ["unet"]}, "unknown architecture"),
        ("config.json", {"normalization": []}, "normalization must be a JSON object"),
        ("config.json", {"normalization": {"mean": [0, 0], "std": [1, 1, 1]}}, "normalization mean"),
        ("config.json", {"normalization": {"mean": [0, 0, 0], "std": [1, 0, 1]}}, "std must be positive"),
        ("config.json", {"decoder": "x"}, "decoder must be a JSON object"),
        ("config.json", {"version": 99}, "config version 99 is newer"),
        ("config.json", {"version": 0}, "config version must be 1 or more"),
        ("config.json", {"tiles": 3}, "unknown keys tiles"),
    ],
)
def test_a_damaged_checkpoint_is_one_line(tmp_path, file, damage, reason):
    config = tiny_config()
    folder = save_checkpoint(build_network(config), config, tmp_path / "ckpt")
    path = folder / file
    data = path.read_bytes()
    if isinstance(damage, dict):
        new = json.dumps({**json.loads(data), **damage}).encode()
    else:
        new = {
            "truncated": data[: len(data) // 2],
            "garbage": os.urandom(4096),
            "empty": b"",
            "bad json": b'{"arch": ',
            "deep json": b"[" * 200_000 + b"]" * 200_000,
            "binary": b"\xff\xfe\x00garbage",
        }[damage]
    path.write_bytes(new)
    with pytest.raises(ModelError, match=reason) as err:
        load_checkpoint(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


# 4. absurd sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"input_size": 100_000}, "multiple of 32 up to 4096"),
        ({"input_size": 4128}, "multiple of 32 up to 4096"),
        ({"input_size": 100}, "multiple of 32"),
        ({"input_size": 0}, "input_size must be positive"),
        ({"tile_size": 100_000}, "between 16 and 8192 px"),
        ({"tile_size": 4}, "between 16 and 8192 px"),
        ({"tile_size": 0}, "tile_size must be positive"),
        ({"tile_size": 64, "overlap": 64}, "overlap must be in [0, tile_size)"),
        ({"overlap": -1}, "overlap must be in [0, tile_size)"),
        ({"mpp": 1e6}, "mpp must be between 0.05 and 50"),
        ({"mpp": 0.001}, "mpp must be between 0.05 and 50"),
        ({"mpp": math.nan}, "mpp must be positive"),
        ({"mpp": math.inf}, "mpp must be between"),
        ({"mpp": 0}, "mpp must be positive"),
    ],
)
def test_absurd_sizes_are_refused_with_the_limit(changes, reason):
    with pytest.raises(ModelError, match=reason.replace("[", r"\[").replace(")", r"\)")) as err:
        tiny_config(**changes)
    assert "\n" not in str(err.value)


def test_sane_sizes_still_pass():
    config = tiny_config(input_size=4096, tile_size=8192, overlap=8191, mpp=0.05)
    assert (config.input_size, config.tile_size, config.mpp) == (4096, 8192, 0.05)
    assert tiny_config(tile_size=512.0, mpp=2).tile_size == 512 and isinstance(tiny_config(mpp=2).mpp, float)


@pytest.mark.parametrize("option", [["--input", "100000"], ["--tile", "100000"], ["--mpp", "1000"]])
def test_model_init_refuses_absurd_sizes_before_writing(tmp_path, capsys, option):
    out = tmp_path / "ckpt"
    assert main(["model", "init", "--arch", "unet", "--encoder", "mobilenet_v2", "--out", str(out), *option]) == 2
    one_error_line(capsys, "4096" if option[0] == "--input" else "8192" if option[0] == "--tile" else "50")
    assert listing(tmp_path) == set()


@pytest.mark.parametrize("option", [["--input", "100000"], ["--tile", "100000"]])
def test_train_refuses_absurd_sizes_before_writing(tiny_dataset, tmp_path, capsys, option):
    before = listing(tmp_path)
    data = ["--annotations", str(tiny_dataset / "masks"), "--images", str(tiny_dataset / "images")]
    assert main(["train", *data, "--epochs", "1", "--device", "cpu", *option, "--out", str(tmp_path / "x")]) == 2
    one_error_line(capsys, "4096" if option[0] == "--input" else "8192")
    assert listing(tmp_path) == before


def test_fine_tuning_refuses_absurd_sizes_and_a_poisoned_start(tiny_dataset, tmp_path, capsys):
    config = tiny_config()
    start = save_checkpoint(build_network(config), config, tmp_path / "start")
    poisoned = poisoned_checkpoint(tmp_path / "poisoned", count=1)
    before = listing(tmp_path)
    data = ["--annotations", str(tiny_dataset / "masks"), "--images", str(tiny_dataset / "images")]
    base = ["train", *data, "--epochs", "1", "--device", "cpu", "--image-mpp", "1", "--out", str(tmp_path / "x")]
    assert main([*base, "--from", str(start), "--tile", "100000"]) == 2
    one_error_line(capsys, "8192")
    assert main([*base, "--from", str(start), "--tile", "0"]) == 2  # was silently ignored
    one_error_line(capsys, "tile_size must be positive")
    assert main([*base, "--from", str(poisoned)]) == 2
    one_error_line(capsys, "1 of", "NaN or infinite")
    assert listing(tmp_path) == before


def test_a_checkpoint_with_absurd_sizes_is_refused_on_load(tmp_path, capsys):
    config = tiny_config()
    folder = save_checkpoint(build_network(config), config, tmp_path / "ckpt")
    for key in ("input_size", "tile_size"):
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, key: 100_000}))
        with pytest.raises(ModelError, match=r"config\.json: .*(4096|8192)"):
            load_checkpoint(folder)
        (folder / "config.json").write_text(json.dumps(data))
    (folder / "config.json").write_text(
        json.dumps({**json.loads((folder / "config.json").read_text()), "tile_size": 100_000})
    )
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "slide.png")
    out = tmp_path / "x.zarr"
    assert main(["segment", str(tmp_path / "slide.png"), "--mpp", "1", "--model", str(folder), "--out", str(out)]) == 2
    one_error_line(capsys, "tile_size must be between 16 and 8192 px, not 100000")
    assert not out.exists()
