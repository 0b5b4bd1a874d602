"""CellViT: our network loads the published checkpoints' keys strictly; HoVer-Net post-processing finds nuclei.

No weights can be downloaded here, so the network is checked against the published
structure (every key and shape, recorded from the authors' TIO-IKIM/CellViT model
code, and the published file sizes), a real-size CellViT-256 checkpoint with
random weights is written in the authors' format and loaded, and a tiny CellViT
runs end to end on a real kidney crop.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from conftest import require_shared
from napari_nephro.evaluation.instances import match_instances
from napari_nephro.models import cellvit
from napari_nephro.models.cellvit import (
    CHECKPOINT_URLS,
    CellViT,
    CellViTSegmenter,
    CellViTSpec,
    SamEncoder,
    build_cellvit,
    load,
)
from napari_nephro.models.errors import ModelError
from napari_nephro.models.hovernet import HoverParams, hover_instances, hv_targets

pytestmark = pytest.mark.filterwarnings("ignore:CellViT")  # the weights' licence, told at every load here


@pytest.fixture(autouse=True)
def untold(monkeypatch):
    """Each test starts as a fresh process would: the licence not yet told."""
    monkeypatch.setattr(cellvit, "_told", set())


# sorted "key:shape" lines of each published network, hashed (sha256, 16 hex digits), with their counts: taken once
# from the authors' CellViT256 / CellViTSAM classes built in a scratch environment
PUBLISHED = {
    "CellViT256": (439, "2e5c16fdd4ae0393", 46_764_240),
    "SAM-B": (466, "22214cc66b872bb1", 146_113_728),
    "SAM-L": (634, "d21acd2c5db7c00a", 367_866_816),
    "SAM-H": (746, "2514652ef85a72ac", 699_760_320),
}
# bytes of the published files (as users list them after download): 4 bytes a weight plus the pickle's frame
PUBLISHED_BYTES = {"CellViT256": 187_224_155, "SAM-H": 2_799_315_941}


def _spec(name: str) -> CellViTSpec:
    return CellViTSpec("CellViT256") if name == "CellViT256" else CellViTSpec("CellViTSAM", backbone=name)


def _signature(state: dict) -> tuple[int, str, int]:
    lines = sorted(f"{k}:{tuple(v.shape)}" for k, v in state.items())
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    return len(lines), digest, sum(v.numel() for v in state.values())


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_networks_have_the_published_keys_and_shapes(name):
    with torch.device("meta"):
        state = build_cellvit(_spec(name)).state_dict()
    assert _signature(state) == PUBLISHED[name]
    if name in PUBLISHED_BYTES:  # the weights fill the published file, float32, a few hundred kB of frame aside
        assert 0 < PUBLISHED_BYTES[name] - 4 * PUBLISHED[name][2] < 1_000_000
    dim = 384 if name == "CellViT256" else {"SAM-B": 768, "SAM-L": 1024, "SAM-H": 1280}[name]
    assert state["nuclei_type_maps_decoder.decoder0_header.2.weight"].shape == (6, 64, 1, 1)
    assert state["hv_map_decoder.decoder0_header.2.weight"].shape == (2, 64, 1, 1)
    assert state["decoder1.0.block.0.weight"].shape[0] == dim
    tissue = "encoder.head.weight" if name == "CellViT256" else "classifier_head.weight"
    assert state[tissue].shape[0] == 19


def _trainer_config(**extra) -> dict:
    """The config as the authors' trainer stores it: the run's settings flattened with '.'."""
    config = {
        "data.dataset": "PanNuke",
        "data.num_nuclei_classes": 6,
        "data.num_tissue_classes": 19,
        "model.shared_skip_connections": True,
        "training.mixed_precision": True,
        "transformations.normalize.mean": [0.5, 0.5, 0.5],
        "transformations.normalize.std": [0.5, 0.5, 0.5],
        "dataset_config.nuclei_types.Background": 0,
        "dataset_config.nuclei_types.Neoplastic": 1,
        "dataset_config.nuclei_types.Inflammatory": 2,
        "dataset_config.nuclei_types.Connective": 3,
        "dataset_config.nuclei_types.Dead": 4,
        "dataset_config.nuclei_types.Epithelial": 5,
    }
    config.update(extra)
    return config


def _save(path, arch: str, state: dict, config: dict, **extra) -> None:
    torch.save({"arch": arch, "epoch": 129, "model_state_dict": state, "config": config, **extra}, path)


def test_a_real_size_cellvit256_checkpoint_loads_with_every_key(tmp_path, monkeypatch):
    torch.manual_seed(0)
    network = build_cellvit(_spec("CellViT256"))
    state = {k: v.clone() for k, v in network.state_dict().items()}
    path = tmp_path / "CellViT-256-x40.pth"
    # a wandb config can hold numpy numbers; they are data and must not make the checkpoint unreadable
    _save(path, "CellViT256", state, _trainer_config(**{"training.sampling_gamma": np.float64(0.85)}))
    with pytest.warns(UserWarning, match="Commons Clause") as told:
        segmenter = load(path, device="cpu")
    assert len(told) == 1 and "HIPT" in str(told[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(path, device="cpu")  # told once per process
    loaded = segmenter.network.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert segmenter.classes == ["neoplastic", "inflammatory", "connective", "dead", "epithelial"]
    assert (segmenter.mpp, segmenter.tile_size, segmenter.overlap) == (0.25, 1024, 96)
    assert segmenter.kind == "instance" and segmenter.gpu_model and "Commons Clause" in segmenter.licence
    assert segmenter.hover == HoverParams(sobel_size=21, min_size=10)


def _tiny_state(seed: int = 0) -> tuple[CellViTSpec, dict]:
    spec = CellViTSpec("CellViT", embed_dim=32, depth=4, heads=2, extract=(1, 2, 3, 4))
    torch.manual_seed(seed)
    return spec, build_cellvit(spec).state_dict()


def _tiny_config(**extra) -> dict:
    tiny = {"model.embed_dim": 32, "model.depth": 4, "model.num_heads": 2, "model.extract_layers": [1, 2, 3, 4]}
    return _trainer_config(**{**tiny, **extra})


def test_x20_checkpoints_work_at_half_the_resolution(tmp_path):
    _, state = _tiny_state()
    path = tmp_path / "tiny-x20.pth"
    _save(path, "CellViT", state, _tiny_config(**{"data.magnification": 20}))
    segmenter = load(path, device="cpu", tile_size=512)
    assert (segmenter.mpp, segmenter.tile_size, segmenter.overlap) == (0.5, 512, 48)
    assert segmenter.hover == HoverParams(sobel_size=11, min_size=3)


class Payload:
    """Any object a pickle can carry: with weights_only it must never be built."""

    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize(
    "content",
    ["object", "no state", "wrong shape", "extra key", "unknown arch", "unknown backbone", "not torch"],
)
def test_what_is_not_a_cellvit_checkpoint_is_refused_in_one_line(tmp_path, content, capsys):
    _, state = _tiny_state()
    path = tmp_path / "bad.pth"
    config = _tiny_config()
    if content == "object":
        _save(path, "CellViT", state, config, trainer=Payload())
    elif content == "no state":
        torch.save({"arch": "CellViT", "config": config, "weights": state}, path)
    elif content == "wrong shape":
        _save(path, "CellViT", state, _tiny_config(**{"model.embed_dim": 64}))
    elif content == "extra key":
        _save(path, "CellViT", {**state, "encoder.spare": torch.zeros(1)}, config)
    elif content == "unknown arch":
        _save(path, "CellViTShared", state, config)
    elif content == "unknown backbone":
        _save(path, "CellViTSAM", state, _tiny_config(**{"model.backbone": "SAM-X"}))
    else:
        path.write_bytes(b"\x89PNG\r\n\x1a\n not a checkpoint")
    with pytest.raises(ModelError) as error:
        load(path, device="cpu")
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "this ran" not in capsys.readouterr().out
    expected = {
        "object": "Unsupported global",
        "no state": "model_state_dict",
        "wrong shape": "do not match",
        "extra key": "encoder.spare",
        "unknown arch": "CellViTShared",
        "unknown backbone": "SAM-X",
        "not torch": "not a CellViT checkpoint",
    }[content]
    assert expected in message


def test_sam_weights_in_a_vit_checkpoint_are_refused(tmp_path):
    _, state = _tiny_state()
    path = tmp_path / "sam.pth"
    _save(path, "CellViTSAM", state, _tiny_config(**{"model.backbone": "SAM-B"}))
    with pytest.raises(ModelError, match=r"do not match CellViTSAM \(SAM-B\)"):
        load(path, device="cpu")


def test_missing_weights_say_where_to_get_them_and_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_NEPHRO_CELLVIT", str(tmp_path))
    for name, url in [
        (None, CHECKPOINT_URLS["CellViT-SAM-H-x40.pth"]),
        ("CellViT-256-x20", CHECKPOINT_URLS["CellViT-256-x20.pth"]),
    ]:
        with pytest.raises(ModelError) as error:
            load(name)
        message = str(error.value)
        assert "\n" not in message and url in message and str(tmp_path) in message
    with pytest.raises(ModelError, match=r"my-cellvit\.pth not found.*github\.com/TIO-IKIM/CellViT"):
        load(tmp_path / "my-cellvit.pth")


def test_default_weights_are_found_in_the_weights_folder(tmp_path, monkeypatch):
    _, state = _tiny_state()
    monkeypatch.setenv("NAPARI_NEPHRO_CELLVIT", str(tmp_path))
    _save(tmp_path / "CellViT-256-x40.pth", "CellViT", state, _tiny_config())
    assert cellvit.find_checkpoint(None) == tmp_path / "CellViT-256-x40.pth"
    assert cellvit.find_checkpoint("CellViT-256-x40") == tmp_path / "CellViT-256-x40.pth"
    assert cellvit.find_checkpoint(tmp_path) == tmp_path / "CellViT-256-x40.pth"


def test_unknown_options_name_the_valid_ones():
    with pytest.raises(ModelError, match=r"unknown CellViT option.*tile: valid ones are tile_size, overlap"):
        load(None, tile=512)


@pytest.fixture(scope="module")
def kidney_tiles() -> np.ndarray:
    folder = require_shared("nuclei", "nuinsseg_kidney", "test", "images")
    crops = [
        np.asarray(Image.open(folder / name).convert("RGB"))[160:352, 160:352]
        for name in ("human_kidney_02.png", "mouse_kidney_01.png")
    ]
    return np.stack(crops)


def test_a_tiny_cellvit_runs_end_to_end_on_kidney_crops(tmp_path, kidney_tiles):
    _, state = _tiny_state(seed=3)
    path = tmp_path / "tiny.pth"
    _save(path, "CellViT", state, _tiny_config())
    segmenter = load(path, device="cpu", batch_size=2)
    # the maps are the network's on the tile scaled to [-1, 1] (the checkpoint's mean and std of 0.5)
    maps = segmenter.predict_maps(kidney_tiles)
    x = torch.from_numpy(kidney_tiles[1:]).permute(0, 3, 1, 2).float() / 255  # the second: order is kept too
    with torch.inference_mode():
        direct = segmenter.network((x - 0.5) / 0.5)
    np.testing.assert_allclose(maps["hv"][1:], direct["hv_map"].numpy(), atol=1e-5)
    np.testing.assert_allclose(maps["foreground"][1:], direct["nuclei_binary_map"].softmax(1)[:, 1].numpy(), atol=1e-5)
    np.testing.assert_allclose(maps["types"][1:], direct["nuclei_type_map"].softmax(1).numpy(), atol=1e-5)
    assert maps["types"].shape == (2, 6, 192, 192) and maps["tissue"].shape == (2, 19)
    # random weights give a nearly flat foreground: spread its logit and centre it, so some pixels are nucleus
    logit = np.log(maps["foreground"]) - np.log1p(-maps["foreground"])
    gain, centre = 2 / logit.std(), float(np.median(logit))
    head = segmenter.network.nuclei_binary_map_decoder.decoder0_header[2]
    with torch.no_grad():
        head.weight[1], head.weight[0] = gain * (head.weight[1] - head.weight[0]), 0
        head.bias[1], head.bias[0] = gain * (head.bias[1] - head.bias[0] - centre), 0
    seen = {}
    predict_maps = segmenter.predict_maps
    segmenter.predict_maps = lambda tiles: seen.setdefault("maps", predict_maps(tiles))
    results = segmenter.predict_instances(kidney_tiles)
    assert len(results) == 2
    for i, result in enumerate(results):
        assert result.labels.shape == (192, 192) and result.labels.dtype == np.int32
        assert set(np.unique(result.labels)) == set(range(result.count + 1))
        fg, hv, types = (seen["maps"][k][i] for k in ("foreground", "hv", "types"))
        assert 0.05 < (fg >= 0.5).mean() < 0.95
        expected = hover_instances(fg, hv, types, params=segmenter.hover)
        np.testing.assert_array_equal(result.labels, expected.labels)
        np.testing.assert_array_equal(result.classes, expected.classes)
    odd = predict_maps(kidney_tiles[1:, :184, :184])  # sides that are no multiple of 16 are padded and cut back
    assert odd["foreground"].shape == (1, 184, 184) and np.isfinite(odd["hv"]).all()


class PaintedLogits(torch.nn.Module):
    """Stands in for the network: the logits it would give for painted nuclei, tile by tile."""

    def __init__(self, labels: list[np.ndarray], types: list[dict[int, int]]) -> None:
        super().__init__()
        self.labels, self.types, self.calls = labels, types, 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {k: [] for k in ("nuclei_binary_map", "hv_map", "nuclei_type_map", "tissue_types")}
        for _ in range(x.shape[0]):
            labels, types = self.labels[self.calls], self.types[self.calls]
            self.calls += 1
            inside = torch.from_numpy(labels > 0).float()
            out["nuclei_binary_map"].append(torch.stack([5 * (1 - inside), 5 * inside]))
            out["hv_map"].append(torch.from_numpy(hv_targets(labels)))
            kind = np.zeros(labels.shape, np.int64)
            for label, channel in types.items():
                kind[labels == label] = channel
            out["nuclei_type_map"].append(4 * torch.nn.functional.one_hot(torch.from_numpy(kind), 6).permute(2, 0, 1))
            out["tissue_types"].append(torch.zeros(19))
        return {k: torch.stack(v).float() for k, v in out.items()}


def test_the_network_logits_become_typed_nuclei_tile_by_tile(kidney_tiles):
    shape = kidney_tiles.shape[1:3]
    two = np.zeros(shape, np.int32)
    two[_disc(shape, 96, 80, 14)] = 1
    two[_disc(shape, 96, 104, 14) & ~_disc(shape, 96, 80, 12)] = 2  # touching the first
    one = np.zeros(shape, np.int32)
    one[_disc(shape, 40, 150, 10)] = 7
    painted = PaintedLogits([two, one], [{1: 1, 2: 3}, {7: 5}])  # neoplastic, connective; epithelial
    spec = CellViTSpec("CellViT", embed_dim=32, depth=4, heads=2, extract=(1, 2, 3, 4))
    segmenter = CellViTSegmenter(painted, spec, device="cpu", batch_size=1)
    first, second = segmenter.predict_instances(kidney_tiles)
    match = match_instances(first.labels, two, 0.9)
    assert first.count == 2 and match.tp == 2
    classes = {t: segmenter.classes[first.classes[p - 1]] for t, p, _ in match.pairs}
    assert classes == {1: "neoplastic", 2: "connective"}
    expected = float(np.exp(4) / (np.exp(4) + 5))  # softmax of 4 against five channels at 0
    np.testing.assert_allclose(first.scores, expected, atol=0.01)  # a border pixel may go to the neighbour
    assert second.count == 1 and segmenter.classes[second.classes[0]] == "epithelial"
    assert match_instances(second.labels, one, 0.9).tp == 1


def test_the_sam_encoder_runs_in_cellvit_and_takes_at_most_1024_px():
    torch.manual_seed(0)
    encoder = SamEncoder(dim=32, depth=4, heads=2, global_blocks=(1,), extract=(1, 2, 3, 4))
    network = CellViT(encoder, 32, 6, 19)
    spec = CellViTSpec("CellViTSAM", backbone="SAM-B")
    segmenter = CellViTSegmenter(network, spec, device="cpu", tile_size=128)
    maps = segmenter.predict_maps(np.full((1, 128, 128, 3), 200, np.uint8))
    assert maps["hv"].shape == (1, 2, 128, 128) and np.isfinite(maps["types"]).all()
    with pytest.raises(ModelError, match="at most 1024 px"):
        CellViTSegmenter(network, spec, device="cpu", tile_size=2048)


# ------------------------------------------------------------------------------------------- HoVer-Net


def _disc(shape, cy, cx, r) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


def test_two_touching_nuclei_come_back_as_two_with_their_types():
    shape = (64, 96)
    left, right = _disc(shape, 32, 36, 13), _disc(shape, 32, 58, 13)  # centres 22 px apart: they overlap
    labels = np.zeros(shape, np.int32)
    labels[left] = 1
    labels[right & ~left] = 2
    labels[right & left & (np.mgrid[: shape[0], : shape[1]][1] >= 47)] = 2  # the overlap cut in the middle
    foreground = (labels > 0).astype(np.float32)
    types = np.zeros((6, *shape), np.float32)
    types[0] = 1.0 - foreground
    types[1][labels == 1] = 0.8  # neoplastic
    types[0][labels == 1] = 0.2
    types[3][labels == 2] = 0.7  # connective
    types[2][labels == 2] = 0.3
    found = hover_instances(foreground, hv_targets(labels), types)
    match = match_instances(found.labels, labels, 0.9)
    assert (found.count, match.tp) == (2, 2)
    by_truth = {t: p for t, p, _ in match.pairs}
    assert found.classes[by_truth[1] - 1] == 0 and found.classes[by_truth[2] - 1] == 2
    np.testing.assert_allclose(found.scores[[by_truth[1] - 1, by_truth[2] - 1]], [0.8, 0.7], atol=1e-6)
    # the same foreground with the offsets of one merged object is one nucleus: the HV maps split them
    merged = hover_instances(foreground, hv_targets((labels > 0).astype(np.int32)), types)
    assert merged.count == 1


def test_hv_targets_are_offsets_to_the_centre_scaled_per_side():
    labels = np.zeros((5, 8), np.int32)
    labels[2, 1:6] = 3  # a bar: centre x = 3
    labels[0:4, 7] = 5  # a column: centre y = 1.5
    hv = hv_targets(labels)
    np.testing.assert_allclose(hv[0, 2, 1:6], [-1, -0.5, 0, 0.5, 1])
    np.testing.assert_allclose(hv[1, 0:4, 7], [-1, -1 / 3, 1 / 3, 1])
    np.testing.assert_array_equal(hv[1, 2, 1:6], 0)  # one row: no vertical extent
    np.testing.assert_array_equal(hv[0, 0:4, 7], 0)
    np.testing.assert_array_equal(hv[:, labels == 0], 0)
    step = np.zeros((4, 4), np.int32)
    step[1:3, 0:3] = 1
    step[3, 0] = 1  # lopsided: the sides are scaled apart, so both reach their bound
    hv = hv_targets(step)
    assert hv[0][step > 0].min() == -1 and hv[0][step > 0].max() == 1
    assert hv[1][step > 0].min() == -1 and hv[1][step > 0].max() == 1


def _touching_discs(seed: int, size: int = 192, spacing: int = 24) -> np.ndarray:
    """Discs of radius 10-14 on a jittered 24 px grid, each overlap given to the nearer centre."""
    rng = np.random.default_rng(seed)
    grid = np.arange(spacing // 2, size, spacing)
    centres = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2) + rng.uniform(-3, 3, (grid.size**2, 2))
    radii = rng.uniform(10, 14, len(centres))
    yy, xx = np.mgrid[:size, :size]
    distance = np.hypot(yy[..., None] - centres[:, 1], xx[..., None] - centres[:, 0]) / radii
    return np.where(distance.min(-1) < 1, distance.argmin(-1) + 1, 0).astype(np.int32)


@pytest.mark.parametrize("seed", [0, 1])
def test_hover_recovers_the_instances_its_targets_were_made_from(seed):
    labels = _touching_discs(seed)
    touching = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    assert touching.sum() > 200  # the discs do touch
    found = hover_instances((labels > 0).astype(np.float32), hv_targets(labels))
    match = match_instances(found.labels, labels, 0.9)
    assert match.n_true == 64 and match.tp == 64 and match.fp == 0
    blobs = ndimage.label(labels > 0)[0].max()
    assert blobs < 20  # without the HV maps they would be a few large blobs


def test_hover_recovers_real_kidney_nuclei_from_their_targets():
    """The targets our training will make from NuInsSeg's masks: post-processing must give those nuclei back."""
    import tifffile

    folder = require_shared("nuclei", "nuinsseg_kidney", "test", "inst_labels")
    labels = tifffile.imread(folder / "human_kidney_07.tif").astype(np.int32)
    found = hover_instances((labels > 0).astype(np.float32), hv_targets(labels))
    match = match_instances(found.labels, labels, 0.9)
    assert match.n_true > 100 and match.tp >= 0.97 * match.n_true and match.fp <= 2


def test_a_nucleus_all_of_whose_pixels_vote_background_is_dropped():
    labels = np.zeros((48, 96), np.int32)
    labels[_disc(labels.shape, 24, 24, 12)] = 1
    labels[_disc(labels.shape, 24, 72, 12)] = 2
    types = np.zeros((6, *labels.shape), np.float32)
    types[0] = 1.0
    types[:, labels == 1] = 0.0
    types[5][labels == 1] = 0.9  # epithelial
    types[0][labels == 1] = 0.1
    found = hover_instances((labels > 0).astype(np.float32), hv_targets(labels), types)
    assert found.count == 1 and found.classes.tolist() == [4]
    assert set(np.unique(labels[found.labels == 1])) == {1}


def test_hover_finds_nothing_in_an_empty_tile():
    found = hover_instances(np.zeros((32, 32)), np.zeros((2, 32, 32)), np.zeros((6, 32, 32)))
    assert found.count == 0 and found.labels.shape == (32, 32) and not found.labels.any()
