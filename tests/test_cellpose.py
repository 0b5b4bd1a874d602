"""Cellpose adapters: the classic net (ours) loads published files strictly, and tiles become nuclei through the
installed cellpose's dynamics; Cellpose-SAM runs through cellpose 4's own eval; nothing is ever downloaded.

No real weights exist on CI (and Cellpose-SAM's are 1.2 GB), so: the classic net is
built at real size and its state dict checked against the key names and shapes of
Cellpose 3's `resnet_torch.CPnet`; the path from tile to masks is tested with
stand-in networks whose outputs are the true flows of the nuclei in the tile, so a
wrong channel, orientation, flow order or tile order cannot pass.

Measured on this project's CI machine (2 cores, OMP threads 2, fp32, random weights at real size), which gives
`cpu_seconds_per_megapixel`:
- classic `nuclei` net, one 544 px tile (3 x 3 blocks of 224 px): network 6.5 s; dynamics on a 512 px tile half
  covered by nuclei (NuInsSeg's human_kidney_08, true flows) 2.1 s: about 9 s a tile, 30 s per megapixel;
- Cellpose-SAM (`cellpose.vit.CPSAM`), one 256 px block: 12-16 s; a 624 px tile is 3 x 3 blocks, about 130 s,
  350 s per megapixel (a 512 px image, also 3 x 3 blocks once padded: about 2 minutes). No GPU figure was measured.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import require_shared
from napari_nephro.evaluation.instances import match_instances
from napari_nephro.models import cellpose_adapter as ca
from napari_nephro.models.cellpose_classic import CellposeNet, classic_input, predict_flows
from napari_nephro.models.errors import ModelError

# Cellpose 3.1 resnet_torch.CPnet([2, 32, 64, 128, 256], 3, sz=3), read from MouseLand/cellpose at v3.1.1.3: a few of
# its 313 state-dict entries, with their shapes
PUBLISHED = {
    "diam_mean": (1,),
    "diam_labels": (1,),
    "downsample.down.res_down_0.conv.conv_0.0.weight": (2,),
    "downsample.down.res_down_0.conv.conv_0.2.weight": (32, 2, 3, 3),
    "downsample.down.res_down_0.proj.0.running_var": (2,),
    "downsample.down.res_down_0.proj.1.weight": (32, 2, 1, 1),
    "downsample.down.res_down_3.conv.conv_3.2.weight": (256, 256, 3, 3),
    "upsample.up.res_up_3.conv.conv_0.2.weight": (256, 256, 3, 3),
    "upsample.up.res_up_3.conv.conv_1.full.weight": (256, 256),
    "upsample.up.res_up_2.proj.1.weight": (128, 256, 1, 1),
    "upsample.up.res_up_0.conv.conv_3.full.weight": (32, 256),
    "upsample.up.res_up_0.conv.conv_3.conv.2.weight": (32, 32, 3, 3),
    "upsample.up.res_up_0.proj.1.weight": (32, 64, 1, 1),
    "output.0.running_var": (32,),
    "output.2.weight": (3, 32, 1, 1),
}


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cellpose-models"
    folder.mkdir()
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(folder))
    return folder


@pytest.fixture
def no_download(monkeypatch) -> list:
    """Every way cellpose (or anything) could fetch a file raises, and is recorded."""
    import urllib.request

    import cellpose.models
    import cellpose.utils

    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"tried to download {args}")

    monkeypatch.setattr(cellpose.utils, "download_url_to_file", refuse)
    monkeypatch.setattr(cellpose.models, "cache_model_path", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


# ------------------------------------------------------------------------------------------ weights


def test_the_real_size_net_has_cellpose_3s_keys_and_a_saved_file_loads_with_every_key(models_dir, no_download):
    network = CellposeNet(diam_mean=17.0)
    state = network.state_dict()
    assert len(state) == 313
    assert {k: tuple(state[k].shape) for k in PUBLISHED} == PUBLISHED
    params = sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)
    assert 6.5e6 < params < 6.7e6  # Cellpose's "6.6 M parameters"
    with torch.no_grad():  # weights unlike any default, so a key left unloaded shows
        for value in state.values():
            if value.is_floating_point():
                value.copy_(torch.rand_like(value) + 0.5)
    torch.save(state, models_dir / "nucleitorch_0")

    segmenter = ca.load(None, device="cpu")  # no PATH: the classic nuclei net from cellpose's folder
    loaded = segmenter.network.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert segmenter.name == "nuclei" and segmenter.classes == ["nucleus"] and not segmenter.gpu_model
    assert segmenter.mpp == pytest.approx(7.5 / 17)  # nuclei of 7.5 um at the net's 17 px
    assert segmenter.overlap > 3 * 17 and segmenter.tile_size == ca.DEFAULT_TILE
    assert ca.load("nuclei", device="cpu", diameter=9).mpp == pytest.approx(9 / 17)
    assert ca.load(str(models_dir / "nucleitorch_0"), device="cpu").fingerprint == segmenter.fingerprint
    assert ca.load(None, device="cpu", flow_threshold=0.6).fingerprint != segmenter.fingerprint
    assert no_download == []


def test_cyto3_and_a_user_model_take_their_diameter_from_cellpose_and_the_file(models_dir):
    network = CellposeNet(diam_mean=30.0)
    torch.save(network.state_dict(), models_dir / "cyto3")
    assert ca.load("cyto3", device="cpu").mpp == pytest.approx(7.5 / 30)
    user = CellposeNet(diam_mean=22.0)
    old = {k: v for k, v in user.state_dict().items() if not k.startswith("diam_")}  # a file from before Cellpose 2
    torch.save(user.state_dict(), models_dir / "mine.pth")
    torch.save(old, models_dir / "old.pth")
    assert ca.load(str(models_dir / "mine.pth"), device="cpu").mpp == pytest.approx(7.5 / 22)
    assert ca.load(str(models_dir / "old.pth"), device="cpu").mpp == pytest.approx(7.5 / 30)


class Payload:
    """An object whose unpickling would run code: it must never be unpickled."""

    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize("content", ["object", "missing key", "extra key", "wrong shape", "not torch", "neither"])
def test_what_is_not_a_cellpose_file_is_refused_in_one_line(tmp_path, content, capsys):
    state = CellposeNet((2, 8, 16, 32)).state_dict()
    path = tmp_path / "model"
    if content == "object":
        with open(path, "wb") as f:
            pickle.dump({"weights": Payload()}, f)
    elif content == "missing key":
        torch.save({k: v for k, v in state.items() if k != "output.2.bias"}, path)
    elif content == "extra key":
        torch.save({**state, "upsample.spare": torch.zeros(1)}, path)
    elif content == "wrong shape":
        torch.save({**state, "output.0.weight": torch.zeros(9)}, path)
    elif content == "not torch":
        path.write_bytes(b"\x89PNG\r\n\x1a\n not a model")
    else:
        torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(ModelError) as error:
        ca.load(str(path), device="cpu")
    message = one_line(error)
    assert str(path) in message
    assert "this ran" not in capsys.readouterr().out
    expected = {
        "object": "can read safely",
        "missing key": "output.2.bias",
        "extra key": "upsample.spare",
        "wrong shape": "output.0.weight",
        "not torch": "not a Cellpose model file",
        "neither": "neither a classic Cellpose net nor Cellpose-SAM",
    }[content]
    assert expected in message


@pytest.mark.parametrize(
    ("name", "url"),
    [
        (None, "https://www.cellpose.org/models/nucleitorch_0"),
        ("cyto3", "https://www.cellpose.org/models/cyto3"),
        ("cpsam", "https://huggingface.co/mouseland/cellpose-sam/resolve/main/cpsam"),
    ],
)
def test_missing_weights_name_the_url_and_the_folder_and_nothing_is_downloaded(models_dir, no_download, name, url):
    with pytest.raises(ModelError) as error:
        ca.load(name, device="cpu")
    message = one_line(error)
    assert url in message and str(models_dir) in message and "CELLPOSE_LOCAL_MODELS_PATH" in message
    assert no_download == []


def test_without_the_variable_cellposes_home_folder_is_used(tmp_path, monkeypatch):
    monkeypatch.delenv("CELLPOSE_LOCAL_MODELS_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".cellpose" / "models").mkdir(parents=True)
    torch.save(CellposeNet((2, 8, 16, 32)).state_dict(), tmp_path / ".cellpose" / "models" / "cyto2torch_0")
    assert ca.load("cyto2", device="cpu").name == "cyto2"


def test_unknown_names_and_options_say_what_is_valid(models_dir):
    with pytest.raises(ModelError) as error:
        ca.load("nucei", device="cpu")
    assert "did you mean 'nuclei'" in one_line(error)
    with pytest.raises(ModelError) as error:
        ca.load(None, device="cpu", diamter=8)
    assert "diamter" in one_line(error) and "diameter" in str(error.value)
    torch.save(CellposeNet((2, 8, 16, 32)).state_dict(), models_dir / "nucleitorch_0")
    for bad, words in [
        ({"diameter": -3}, "diameter must be positive"),
        ({"overlap": 600}, "overlap must be smaller"),
        ({"tile_size": 10}, "tile_size"),
        ({"model": "cyto3"}, "two Cellpose models"),
    ]:
        with pytest.raises(ModelError, match=words):
            ca.load("nuclei", device="cpu", **bad)


# ---------------------------------------------------------------------------------- flows to masks


def discs(size: int, centres, radius: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like tile: dark purple discs on pink with noise, and their true labels."""
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    rng = np.random.default_rng(seed)
    rgb = np.where(labels[..., None] > 0, [90, 50, 140], [235, 190, 215]) + rng.normal(0, 5, (size, size, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8), labels


def true_flows(labels: np.ndarray) -> np.ndarray:
    """(3, H, W) as a trained net would give them: 5 x cellpose's own flows of `labels`, and +-6 logits."""
    from cellpose import dynamics

    mu, _ = dynamics.masks_to_flows_gpu(labels.astype(np.int64), device=torch.device("cpu"))
    return np.concatenate([5.0 * mu, np.where(labels > 0, 6.0, -6.0)[None]]).astype(np.float32)


def test_cellposes_dynamics_give_back_hand_made_nuclei_even_touching_ones():
    yy, xx = np.mgrid[:128, :128]
    labels = np.zeros((128, 128), np.int32)
    shapes = [(30, 30, 10, 7), (30, 47, 9, 9), (80, 40, 12, 8), (90, 95, 8, 13), (40, 100, 7, 7)]
    for i, (cy, cx, ry, rx) in enumerate(shapes, start=1):  # the first two touch: one blob to a threshold
        labels[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = i
    flows = true_flows(labels)
    found = ca.masks_from_flows(flows[:2], flows[2])
    result = match_instances(found, labels, iou_threshold=0.5)
    assert result.tp == 5 and result.fp == 0 and result.mean_matched_iou > 0.9
    instances = ca.instances_from(found, flows[2])
    assert instances.count == 5 and np.all(instances.scores > 0.99)
    assert ca.masks_from_flows(flows[:2], flows[2], cellprob_threshold=7.0).max() == 0  # nothing above 7
    swapped = ca.masks_from_flows(flows[1::-1], flows[2])  # dX given as dY: the flows no longer fit the masks
    assert match_instances(swapped, labels, iou_threshold=0.5).tp < 5


class StandInClassic(nn.Module):
    """For a trained classic net: bright blobs of channel 0 (the inverted gray image) -> their true flows."""

    def __init__(self) -> None:
        super().__init__()
        self.nbase = (2,)
        self.diam_mean = nn.Parameter(torch.tensor([17.0]), requires_grad=False)
        self.blocks: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from scipy import ndimage

        self.blocks.append(tuple(x.shape))
        out = [true_flows(ndimage.label(image[0].numpy() > 0.5)[0]) for image in x]
        return torch.from_numpy(np.stack(out)), torch.zeros(len(x), 256)


def test_the_classic_adapter_finds_the_nuclei_of_each_tile_in_its_place():
    a, truth_a = discs(192, [(40, 40), (40, 110), (100, 70), (150, 150), (150, 40)], 8.5, seed=1)
    b, truth_b = discs(192, [(60, 140), (130, 100), (30, 60)], 8.5, seed=2)
    network = StandInClassic()
    segmenter = ca.CellposeClassicSegmenter(network, device="cpu", tile_size=192, overlap=64)
    found = segmenter.predict_instances(np.stack([a, b]))
    assert network.blocks and all(shape[1:] == (2, 208, 208) for shape in network.blocks)  # padded as cellpose
    for result, truth in zip(found, [truth_a, truth_b], strict=True):
        assert result.labels.shape == (192, 192) and result.labels.dtype == np.int32
        match = match_instances(result.labels, truth, iou_threshold=0.5)
        assert match.tp == truth.max() and match.fp == 0 and match.mean_matched_iou > 0.85
    no_invert = ca.CellposeClassicSegmenter(StandInClassic(), device="cpu", tile_size=192, overlap=64, invert=False)
    assert match_instances(no_invert.predict_instances(a[None])[0].labels, truth_a).tp == 0  # background taken


class Echo(nn.Module):
    """Gives channel 0 of its input as all three outputs: blending blocks must give back the image."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, :1].repeat(1, 3, 1, 1) * 1.0, torch.zeros(len(x), 8)


@pytest.mark.parametrize("shape", [(544, 544), (300, 470)])
def test_blocks_of_224_px_blend_back_to_the_image(shape):
    image = np.random.default_rng(3).random((2, *shape)).astype(np.float32)
    flows = predict_flows(Echo(), image, batch_size=4)
    assert flows.shape == (3, *shape)
    np.testing.assert_allclose(flows[1], image[0], atol=1e-5)


def test_tiles_are_prepared_as_cellpose_3_does_with_channels_0_0():
    tile, labels = discs(96, [(48, 48)], 20)
    x = classic_input(tile)
    assert x.shape == (2, 96, 96) and not x[1].any()  # no nuclear channel
    gray = tile.astype(np.float32).mean(-1)
    lo, hi = np.percentile(gray, (1, 99))
    np.testing.assert_allclose(x[0], 1 - (gray - lo) / (hi - lo), atol=1e-5)  # 1-99 %, inverted
    assert x[0][labels > 0].mean() > 0.9 and x[0][labels == 0].mean() < 0.1
    assert not classic_input(np.full((32, 32, 3), 200, np.uint8)).any()  # a blank tile is all zeros


def test_a_small_random_net_on_kidney_crops_gives_valid_instances():
    folder = require_shared("nuclei", "nuinsseg_kidney")
    rgb = np.asarray(Image.open(folder / "test" / "images" / "human_kidney_08.png").convert("RGB"))
    tiles = np.stack([rgb[:192, :192], rgb[200:392, 250:442]])
    torch.manual_seed(0)
    segmenter = ca.CellposeClassicSegmenter(
        CellposeNet((2, 8, 16, 32, 64)), device="cpu", tile_size=192, overlap=64, flow_threshold=0.0
    )
    flows = segmenter.predict_flows(tiles[0])
    assert flows.shape == (3, 192, 192) and np.isfinite(flows).all()
    segmenter.cellprob_threshold = float(np.median(flows[2]))  # random weights: let half the pixels flow
    found = segmenter.predict_instances(tiles)
    assert len(found) == 2 and sum(f.count for f in found) > 0
    for result in found:
        assert result.labels.shape == (192, 192) and result.labels.dtype == np.int32
        assert set(np.unique(result.labels)) - {0} == set(range(1, result.count + 1))
        assert np.all(result.classes == 0) and result.scores.dtype == np.float32
        assert np.all((result.scores >= 0) & (result.scores <= 1))


# ----------------------------------------------------------------------------------------- Cellpose-SAM


class StandInSAM(nn.Module):
    """For Cellpose-SAM's 300 M parameter net: dark blobs of the normalised RGB -> their true flows."""

    dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.blocks: list[tuple[int, ...]] = []

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from scipy import ndimage

        self.blocks.append(tuple(x.shape))
        out = [true_flows(ndimage.label(image.mean(0).numpy() < 0.5)[0]) for image in x]
        return torch.from_numpy(np.stack(out)), torch.zeros(len(x), 256)


def stand_in_cellpose_model(net: nn.Module):
    """cellpose 4's CellposeModel, its eval and run_net untouched, around a stand-in network."""
    from cellpose import models

    model = object.__new__(models.CellposeModel)
    model.device, model.gpu, model.backbone, model.net = torch.device("cpu"), False, "sam_vitl", net
    model.pretrained_model = "stand-in"
    return model


def test_cellpose_sam_goes_from_tiles_to_nuclei_through_cellposes_own_eval():
    a, truth_a = discs(256, [(60, 60), (60, 180), (180, 120), (190, 200)], 15, seed=4)
    b, truth_b = discs(256, [(90, 90), (170, 190)], 15, seed=5)
    net = StandInSAM()
    segmenter = ca.CellposeSAMSegmenter(stand_in_cellpose_model(net), fingerprint="x", tile_size=256, overlap=112)
    assert segmenter.gpu_model and segmenter.mpp == pytest.approx(0.25)  # 7.5 um nuclei at its 30 px
    found = segmenter.predict_instances(np.stack([a, b]))
    assert net.blocks and all(shape[1:] == (3, 256, 256) for shape in net.blocks)  # cellpose's 256 px blocks
    for result, truth in zip(found, [truth_a, truth_b], strict=True):
        match = match_instances(result.labels, truth, iou_threshold=0.5)
        assert match.tp == truth.max() and match.fp == 0 and match.mean_matched_iou > 0.85
        assert np.all(result.scores > 0.9)
    with pytest.raises(ModelError, match="invert is an option of the classic"):
        ca.CellposeSAMSegmenter(stand_in_cellpose_model(net), invert=False)


def test_a_cpsam_file_is_checked_then_given_to_cellpose_by_its_path(models_dir, no_download, monkeypatch):
    import cellpose.models

    torch.save({"W2": torch.zeros(1), "out.weight": torch.zeros(1)}, models_dir / "cpsam")
    made: list[dict] = []
    stand_in = stand_in_cellpose_model(StandInSAM())

    def fake_model(**kwargs):
        made.append(kwargs)
        return stand_in

    monkeypatch.setattr(cellpose.models, "CellposeModel", fake_model)
    with pytest.raises(ModelError) as error:  # not the real net's keys: refused before cellpose sees it
        ca.load("cpsam", device="cpu")
    assert "do not fit Cellpose-SAM" in one_line(error) and made == []
    monkeypatch.setattr(ca, "check_sam_state", lambda state, path: None)
    segmenter = ca.load("cpsam", device="cpu", diameter=6)
    assert isinstance(segmenter, ca.CellposeSAMSegmenter) and segmenter.mpp == pytest.approx(0.2)
    assert made == [
        {"pretrained_model": str(models_dir / "cpsam"), "device": torch.device("cpu"), "use_bfloat16": False}
    ]
    assert no_download == []


def test_a_cpdino_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "cpdino"
    torch.save({"W2": torch.zeros(1), "encoder.cls_token": torch.zeros(1)}, path)
    with pytest.raises(ModelError) as error:
        ca.load(str(path), device="cpu")
    assert "dinov3" in one_line(error)


def test_cellpose_sam_runs_through_the_engine_on_a_real_kidney_image():
    from conftest import require_shared
    from napari_nephro.inference import segment_instances_region
    from napari_nephro.io import open_slide

    slide = open_slide(require_shared("nuclei", "nuinsseg_kidney", "test", "images", "human_kidney_07.png"), mpp=0.25)
    segmenter = ca.CellposeSAMSegmenter(
        stand_in_cellpose_model(StandInSAM()), fingerprint="x", tile_size=256, overlap=112
    )
    result = segment_instances_region(slide, segmenter, (128, 128, 256, 256), skip_background=False)  # one tile
    ids = np.unique(result.array)
    ids = ids[ids != 0]
    assert result.stats.complete and result.nuclei  # the stand-in outlines dark blobs of the tile
    assert ids.tolist() == sorted(n.id for n in result.nuclei)
