"""Fine-tuning on a review project's exported easy + hard set: every installed family trains one short epoch from a
real set (MoNuSeg nuclei, AIDPATH glomeruli) written in the export's format, its result loads back as that family's
model with changed weights and says where it came from; the draws follow the oversampling weights; a bad set is one
line and leaves nothing behind.

Timings on 2 cores (one epoch of two steps): ours 3 s, CellViT 3 s, the glomerulus U-Net 3 s, the classic Cellpose
net 2 s, StarDist 15 s (two TensorFlow processes: the fine-tune and the reload). Cellpose-SAM is not run here: its
real-size net (300 M parameters) is built with random weights in about 20 s and one training step on a 256 px crop
takes about a minute on a CPU (its forward alone is 12-16 s, tests/test_cellpose.py), a GPU model.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from conftest import require_shared
from napari_nephro.models import ModelConfig
from napari_nephro.models.checkpoint import load_checkpoint, save_checkpoint
from napari_nephro.models.networks import build_network
from napari_nephro.review import finetune as ft
from napari_nephro.review.layout import ReviewError
from napari_nephro.review.oversampling import oversampling_weights
from napari_nephro.training import nuclei_loop

FIELDS = ["image", "mask", "source", "x", "y", "size_level0", "tissue", "foreground", "values", "patch", "set"]
FIELDS += ["model", "weight"]
MONUSEG = ("TCGA-21-5784-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1", "TCGA-AR-A1AK-01Z-00-DX1", "TCGA-E2-A1B5-01Z-00-DX1")
KINDS = ["easy"] * 6 + ["hard"] * 2
SHORT = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "crop": 64, "device": "cpu"}


def write_set(root, pairs, *, mpp, values="instance", classes=None, gamma=0.85, weights=None):
    """A training set as `nephro review export --to tiles` writes it: pairs are (rgb, mask, set)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    kinds = [kind for _, _, kind in pairs]
    weights = oversampling_weights(kinds, gamma) if weights is None else weights
    rows = []
    for k, ((rgb, mask, kind), weight) in enumerate(zip(pairs, weights, strict=True), start=1):
        name = f"p{k:04d}"
        Image.fromarray(rgb).save(root / "images" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint16 if values == "instance" else np.uint8)).save(
            root / "masks" / f"{name}.png"
        )
        row = {"image": f"images/{name}.png", "mask": f"masks/{name}.png", "source": "slide", "x": 0, "y": 0}
        row |= {"size_level0": rgb.shape[0], "tissue": 1, "foreground": float(np.mean(mask > 0)), "values": ""}
        row |= {"patch": name, "set": kind, "model": "A" if kind == "easy" else "corrected", "weight": weight}
        rows.append(row)
    with open(root / "tiles.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    review = {"project": "/somewhere/project", "sets": {k: kinds.count(k) for k in ("easy", "hard")}, "gamma": gamma}
    review |= {"rule": "agreement", "raters": ["ann"]}
    meta = {"tiles": len(rows), "tile_size": pairs[0][0].shape[0], "mpp": mpp, "mask_values": values}
    meta |= {"classes": classes or {}, "review": review}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def monuseg_pairs():
    """Eight 128 px patches at 0.5 um/px (256 px MoNuSeg crops at 0.25 um/px, halved), six easy then two hard."""
    folder = require_shared("nuclei", "monuseg_nonhidden", "train")
    pairs = []
    for k, kind in enumerate(KINDS):
        name = MONUSEG[k // 2]
        y, x = (100, 600) if k % 2 else (500, 200)
        rgb = np.asarray(Image.open(folder / "images" / f"{name}.png").convert("RGB"))[y : y + 256, x : x + 256]
        labels = tifffile.imread(folder / "inst_labels" / f"{name}.tif")[y : y + 256 : 2, x : x + 256 : 2]
        small = np.asarray(Image.fromarray(rgb).resize((128, 128), Image.Resampling.BOX))
        pairs.append((small, labels, kind))
    return pairs


@pytest.fixture(scope="module")
def nuclei_set(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("pairs") / "set", monuseg_pairs(), mpp=0.5)


@pytest.fixture(scope="module")
def hover_folder(tmp_path_factory):
    """A small HoVer U-Net with random weights, as nephro train --task nuclei writes one."""
    config = ModelConfig(
        arch="unet",
        classes=["nucleus"],
        mpp=0.5,
        tile_size=256,
        overlap=32,
        input_size=256,
        heads="hover",
        encoder="mobilenet_v2",
        decoder={"decoder_channels": [32, 16, 16, 8, 8]},
    )
    torch.manual_seed(0)
    return save_checkpoint(build_network(config), config, tmp_path_factory.mktemp("hover") / "model")


def changed(before: dict, after: dict) -> list[str]:
    """The learnt tensors that differ (batch-norm statistics move without learning)."""
    return [k for k in before if "running" not in k and "num_batches" not in k and not torch.equal(before[k], after[k])]


def test_our_nuclei_model_fine_tunes_on_easy_and_hard_drawn_by_their_weights(
    nuclei_set, hover_folder, tmp_path, monkeypatch
):
    from napari_nephro.models.nuclei import load_nuclei_model

    seen = []
    real = nuclei_loop.draw_batch

    def spy(images, weights, *args):
        seen.append(({n.name for n in images}, [n.name for n in images], weights.clone()))
        return real(images, weights, *args)

    monkeypatch.setattr(nuclei_loop, "draw_batch", spy)
    steps = []
    out = ft.finetune(nuclei_set, str(hover_folder), tmp_path / "tuned", **SHORT, progress=lambda *a: steps.append(a))
    assert out == tmp_path / "tuned" and steps == [(1, 2), (2, 2)]
    assert load_nuclei_model(str(out), device="cpu").classes == ["nucleus"]  # a nuclei model wherever one is named
    before, after = load_checkpoint(hover_folder)[0].state_dict(), load_checkpoint(out)[0].state_dict()
    assert changed(before, after)
    provenance = json.loads((out / "config.json").read_text())["provenance"]
    review = provenance["review"]
    assert review["dataset"] == str(nuclei_set) and review["sets"] == {"easy": 6, "hard": 2}
    assert review["project"] == "/somewhere/project" and review["export"]["raters"] == ["ann"]
    assert review["recipe"]["epochs"] == 1 and review["recipe"]["crop"] == 64
    assert provenance["fine_tuned_from"] == str(hover_folder)
    # each training patch is drawn in proportion to its area (all equal here) times its set's weight
    w_easy, w_hard = 8 / (0.85 * 6 + 0.15 * 8), 8 / (0.85 * 2 + 0.15 * 8)
    _, names, weights = seen[0]
    kinds = {f"p{k:04d}": kind for k, kind in enumerate(KINDS, start=1)}
    shares = {kinds[n]: float(w) / (128 * 128) for n, w in zip(names, weights, strict=True)}
    assert shares == pytest.approx({"easy": w_easy, "hard": w_hard})
    assert len(names) < 8  # whole patches held out for validation
    assert not (tmp_path / "tuned.training").exists()


def test_a_huge_hard_weight_draws_every_crop_from_hard_patches(tmp_path):
    pairs = monuseg_pairs()
    root = write_set(tmp_path / "set", pairs, mpp=0.5, weights=[1.0] * 6 + [1e9] * 2)
    tset = ft.read_training_set(root)
    assert tset.weights_from == "tiles.csv"  # every pair used: the weights as written
    images = ft.nucleus_images(tset, 0.5)
    weights = torch.as_tensor(ft.draw_weights(tset, images))
    recipe = nuclei_loop.NucleiRecipe(batch_size=16, crop=128)  # the whole patch: a crop tells its patch
    x, _ = nuclei_loop.draw_batch(images, weights, recipe, torch.Generator().manual_seed(0), None)
    crops = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    hard = [im.image for im in images[6:]]
    assert all(any(np.array_equal(c, h) for h in hard) for c in crops)
    # the same set with equal weights draws easy patches too
    even = nuclei_loop.draw_batch(images, torch.ones(8), recipe, torch.Generator().manual_seed(0), None)[0]
    crops = (even.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert any(not any(np.array_equal(c, h) for h in hard) for c in crops)


def test_the_chosen_sets_are_read_alone_and_reweighted(nuclei_set):
    hard = ft.read_training_set(nuclei_set, ("hard",))
    assert [p.patch for p in hard.pairs] == ["p0007", "p0008"] and {p.kind for p in hard.pairs} == {"hard"}
    assert [p.weight for p in hard.pairs] == [1.0, 1.0] and hard.weights_from.startswith("recomputed")
    both = ft.read_training_set(nuclei_set)
    assert [p.weight for p in both.pairs] == pytest.approx(list(oversampling_weights(KINDS, 0.85)))
    assert both.counts() == {"easy": 6, "hard": 2}


def test_cellvit_fine_tunes_on_the_hard_set_only_and_says_so_beside_it(nuclei_set, tmp_path, monkeypatch):
    from napari_nephro.models import cellvit
    from test_cellvit import _save, _tiny_config, _tiny_state

    _, state = _tiny_state()
    source = tmp_path / "tiny.pth"
    _save(source, "CellViT", state, _tiny_config(**{"data.magnification": 20}))  # 0.5 um/px, as the set
    seen = []
    real = nuclei_loop.train_nuclei
    monkeypatch.setattr(
        nuclei_loop, "train_nuclei", lambda images, *a, **k: seen.append(images) or real(images, *a, **k)
    )
    out = tmp_path / "tuned.pth"
    monkeypatch.setattr(cellvit, "_told", set())  # told once per process: an earlier test may have heard it
    with pytest.warns(UserWarning, match="Commons Clause"):
        assert ft.finetune(nuclei_set, f"cellvit:{source}", out, sets=("hard",), **SHORT) == out
        tuned = cellvit.load(out, device="cpu", tile_size=256)
    assert [n.name for n in seen[0]] == ["p0007", "p0008"]  # only the hard rows
    assert any(k.startswith("hv_map_decoder") for k in changed(state, tuned.network.state_dict()))
    side = json.loads((tmp_path / "tuned.pth.review.json").read_text())
    assert side["family"] == "cellvit" and side["fine_tuned_from"] == f"cellvit:{source}"
    assert side["review"]["dataset"] == str(nuclei_set) and side["review"]["sets"] == {"hard": 2}
    assert side["review"]["weights"] == {"hard": 1.0}
    with pytest.raises(ReviewError, match=r"name it \.pth"):
        ft.finetune(nuclei_set, f"cellvit:{source}", tmp_path / "tuned-folder", **SHORT)
    # a model whose provenance cannot be written is taken back, with its metrics
    monkeypatch.setattr(ft, "sidecar", lambda out: tmp_path / "no-such-folder" / "x.review.json")
    again = tmp_path / "again.pth"
    with pytest.raises(OSError):
        ft.finetune(nuclei_set, f"cellvit:{source}", again, sets=("hard",), **SHORT)
    assert not again.exists() and not again.with_suffix(".metrics.csv").exists()


def glomerulus_pairs():
    """Six 256 px AIDPATH PAS patches at 2 um/px (1024 px at about 0.5 um/px, quartered), class 1 = glomerulus."""
    folder = require_shared("glomeruli", "aidpath_pas")
    pairs = []
    for name, kind in zip(
        ("10003", "10063", "10064", "10102", "10103", "10133"), ["easy"] * 4 + ["hard"] * 2, strict=True
    ):
        rgb = Image.open(folder / "images" / f"{name}.png").convert("RGB").resize((256, 256), Image.Resampling.BOX)
        red = np.asarray(Image.open(folder / "masks" / f"{name}.png").convert("RGB"))[::4, ::4]
        mask = ((red[..., 0] > 128) & (red[..., 1] < 100)).astype(np.uint8)
        pairs.append((np.asarray(rgb), mask, kind))
    return pairs


def test_a_glomerulus_unet_fine_tunes_on_tiles_weighted_by_their_patch(tmp_path, monkeypatch):
    from napari_nephro.cli import main
    from napari_nephro.training import loop

    root = write_set(tmp_path / "set", glomerulus_pairs(), mpp=2.0, values="class", classes={"1": "glomerulus"})
    source = tmp_path / "unet"
    init = ["model", "init", "--arch", "unet", "--encoder", "mobilenet_v2", "--out", str(source)]
    assert main([*init, "--mpp", "2.0", "--tile", "128", "--overlap", "0", "--input", "64"]) == 0
    seen = []
    real = loop.train
    monkeypatch.setattr(loop, "train", lambda tiles, *a, **k: seen.append(tiles) or real(tiles, *a, **k))
    out = ft.finetune(root, str(source), tmp_path / "tuned", epochs=1, batch_size=8, device="cpu")
    before, after = load_checkpoint(source)[0].state_dict(), load_checkpoint(out)[0].state_dict()
    assert changed(before, after)
    tiles = seen[0]
    assert len(tiles) > 6 and len(set(tiles.groups)) == 6  # a patch is cut into the model's tiles
    w_easy, w_hard = 6 / (0.85 * 4 + 0.15 * 6), 6 / (0.85 * 2 + 0.15 * 6)
    expected = [w_hard if g in ("p0005", "p0006") else w_easy for g in tiles.groups]
    assert tiles.weights == pytest.approx(expected)
    review = json.loads((out / "config.json").read_text())["provenance"]["review"]
    assert review["dataset"] == str(root) and review["sets"] == {"easy": 4, "hard": 2}
    with pytest.raises(ReviewError, match=r"glomerulus .*cannot fine-tune nuclei"):
        ft.finetune(root, "nuclei", tmp_path / "other", **SHORT)


def test_the_classic_cellpose_net_fine_tunes_through_train_seg_with_its_probabilities(
    nuclei_set, tmp_path, monkeypatch
):
    from cellpose import train as cp_train

    from napari_nephro.models import cellpose_adapter as ca
    from napari_nephro.models.cellpose_classic import CellposeNet

    torch.manual_seed(0)
    source = tmp_path / "tiny_cellpose"
    net = CellposeNet((2, 8, 16, 32), diam_mean=15.0)  # 7.5 um / 15 px: the set's 0.5 um/px
    torch.save(net.state_dict(), source)
    seen = {}
    real = cp_train.train_seg
    monkeypatch.setattr(cp_train, "train_seg", lambda *a, **k: seen.update(k) or real(*a, **k))
    out = tmp_path / "tuned_cellpose"
    steps = []
    done = ft.finetune(nuclei_set, f"cellpose:{source}", out, **SHORT, lr=0.01, progress=lambda *a: steps.append(a))
    assert done == out and steps == [(1, 2), (2, 2)]
    tuned = ca.load(str(out), device="cpu")
    assert isinstance(tuned, ca.CellposeClassicSegmenter) and tuned.mpp == pytest.approx(0.5)
    assert changed(net.state_dict(), tuned.network.state_dict())
    probs = seen["train_probs"]  # cellpose's own per-image probabilities: weight times area (all 128 x 128 px)
    assert probs / probs[0] == pytest.approx(list(oversampling_weights(KINDS, 0.85) / oversampling_weights(KINDS)[0]))
    side = json.loads((tmp_path / "tuned_cellpose.review.json").read_text())
    assert side["family"] == "cellpose" and side["review"]["sets"] == {"easy": 6, "hard": 2}
    assert side["review"]["recipe"]["train_seg"]["n_epochs"] == 2


BUILD_TINY_STARDIST = """
import json, sys
import keras
from stardist.models import Config2D, StarDist2D

folder = sys.argv[1]
keras.utils.set_random_seed(0)
config = Config2D(n_rays=8, grid=(2, 2), n_channel_in=3, unet_n_depth=1, unet_n_filter_base=8, net_conv_after_unet=16)
model = StarDist2D(config, name="tiny", basedir=folder)
model.keras_model.save_weights(f"{folder}/tiny/weights_best.h5")
json.dump({"prob": 0.5, "nms": 0.3}, open(f"{folder}/tiny/thresholds.json", "w"))
"""


def test_stardist_fine_tunes_in_its_own_tensorflow_process(nuclei_set, tmp_path):
    pytest.importorskip("h5py")
    import h5py

    from napari_nephro.models import stardist_adapter as sa

    if not all(__import__("importlib").util.find_spec(n) for n in ("stardist", "tensorflow")):
        pytest.fail("tensorflow and stardist must be installed to test StarDist: pip install -e '.[stardist]'")
    built = subprocess.run([sys.executable, "-c", BUILD_TINY_STARDIST, str(tmp_path)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    source = tmp_path / "tiny"
    epochs = []
    out = ft.finetune(nuclei_set, f"stardist:{source}", tmp_path / "tuned", **SHORT, on_epoch=epochs.append)
    assert out == tmp_path / "tuned" and [e.epoch for e in epochs] == [1] and epochs[0].val_loss is not None
    assert json.loads((out / "thresholds.json").read_text()) == {"prob": 0.5, "nms": 0.3}

    def weights(path):
        with h5py.File(path) as f:
            found = {}
            f.visititems(lambda name, item: found.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
            return found

    # Keras numbers a process's layers (conv2d, conv2d_1, ...), so the two files name them apart: compare in order
    old, new = weights(source / "weights_best.h5"), weights(out / "weights_best.h5")
    old, new = [old[k] for k in sorted(old)], [new[k] for k in sorted(new)]
    assert [a.shape for a in old] == [b.shape for b in new]
    assert any(not np.array_equal(a, b) for a, b in zip(old, new, strict=True))
    side = json.loads((tmp_path / "tuned.review.json").read_text())
    assert side["family"] == "stardist" and side["review"]["sets"] == {"easy": 6, "hard": 2}
    with sa.load(out) as model:  # a StarDist folder the adapter runs as it is
        image = np.asarray(Image.open(nuclei_set / "images" / "p0001.png"))
        (found,) = model.predict_instances(image[None])
        assert found.labels.shape == (128, 128)


def test_a_run_stopped_or_refused_leaves_nothing(nuclei_set, hover_folder, tmp_path, monkeypatch):
    out = tmp_path / "tuned"
    assert ft.finetune(nuclei_set, str(hover_folder), out, **SHORT, stop=lambda: True) is None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ReviewError, match="sets must be among easy, hard"):
        ft.finetune(nuclei_set, str(hover_folder), out, sets=("medium",), **SHORT)
    with pytest.raises(ReviewError, match="whole number"):
        ft.finetune(nuclei_set, str(hover_folder), out, **{**SHORT, "epochs": 0})
    with pytest.raises(ReviewError, match="not a model to fine-tune"):
        ft.finetune(nuclei_set, str(tmp_path), out, **SHORT)
    real = __import__("importlib").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "stardist" else real(name, *a))
    with pytest.raises(ReviewError, match=r"napari-nephro\[stardist\]"):
        ft.finetune(nuclei_set, "stardist", out, **SHORT)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_training_set_is_one_line(nuclei_set, hover_folder, tmp_path):
    import shutil

    def attempt(root, words):
        with pytest.raises(ReviewError, match=words) as caught:
            ft.finetune(root, str(hover_folder), tmp_path / "out", **SHORT)
        assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()

    attempt(tmp_path / "nowhere", "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    attempt(empty, "no tiles.csv")
    broken = tmp_path / "broken"
    shutil.copytree(nuclei_set, broken)
    text = (broken / "tiles.csv").read_text().splitlines()
    (broken / "tiles.csv").write_text("\n".join(",".join(line.split(",")[:-1]) for line in text) + "\n")
    attempt(broken, "missing columns weight")
    shutil.rmtree(broken)
    shutil.copytree(nuclei_set, broken)
    Image.fromarray(np.zeros((100, 128), np.uint16)).save(broken / "masks" / "p0003.png")
    attempt(broken, "p0003: its mask is 128x100 px but its image 128x128")
    shutil.rmtree(broken)
    shutil.copytree(nuclei_set, broken)
    (broken / "images" / "p0002.png").unlink()
    attempt(broken, "images/p0002.png' is missing")
    (broken / "dataset.json").write_text("{")
    attempt(broken, "not valid JSON")
