"""StarDist adapter: a model folder runs in its own TensorFlow process, tiles come back as valid objects, and every
way it can fail (no files, no TensorFlow, a dead process) is one line; nothing is downloaded.

No real weights exist on CI, so a tiny StarDist2D (8 rays, one U-Net level, random
weights, its rays set to about 4 px) is written as a model folder by StarDist
itself, in a child process, with thresholds.json set from its own probabilities on
a real NuInsSeg kidney crop (so a known, small share of the positions are candidates).

TensorFlow is never imported into this process: on the project's machines
importing torchvision after TensorFlow is a segmentation fault (`import tensorflow;
import torchvision` exits 139; the other order works), and this process has torch.

Measured on this project's machine (2 cores), giving `cpu_seconds_per_megapixel`: the real-size 2D_versatile_he
network (Config2D defaults: 32 rays, grid 2, U-Net of depth 3 from 32 filters, 1.43 M parameters), random
weights, 1.33 s per 1024 px tile (0.36 s at 512 px); StarDist's NMS on the true shapes of 2,300 MoNuSeg nuclei at
0.5 um/px (four copies of TCGA-2Z-A9J9's labels) 0.1-0.25 s and drawing them 0.16 s: about 1.7 s per megapixel.
Starting the worker (TensorFlow's import and the model) takes 5-6 s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import require_shared
from napari_nephro.models import stardist_adapter as sa
from napari_nephro.models.errors import ModelError

HAS_TENSORFLOW = all(importlib.util.find_spec(name) is not None for name in ("tensorflow", "stardist"))
needs_tensorflow = pytest.mark.skipif(
    not HAS_TENSORFLOW and not os.environ.get("CI"),  # CI installs the testing extra: there a missing one fails
    reason="tensorflow or stardist not installed (pip install 'napari-nephro[stardist]')",
)

BUILD_TINY = """
import json, sys
import numpy as np
from PIL import Image
import keras
from stardist.models import Config2D, StarDist2D

folder, image = sys.argv[1], sys.argv[2]
keras.utils.set_random_seed(0)
config = Config2D(n_rays=8, grid=(2, 2), n_channel_in=3, unet_n_depth=1, unet_n_filter_base=8, net_conv_after_unet=16)
model = StarDist2D(config, name="tiny", basedir=folder)
dist = model.keras_model.get_layer("dist")  # random rays are about 0 px long: make them 4 px
kernel, bias = dist.get_weights()
dist.set_weights([kernel * 0.02, np.full_like(bias, 4.0)])
model.keras_model.save_weights(f"{folder}/tiny/weights_best.h5")
tile = np.asarray(Image.open(image).convert("RGB"), np.float32)[:256, :256]
low, high = np.percentile(tile, (1, 99.8))
prob, _ = model.predict((tile - low) / (high - low), axes="YXC")
inner = prob[8:-8, 8:-8]  # random weights rate the padded border highest: take the thresholds from the inside
quantiles = {"json": float(np.quantile(inner, 0.98)), "given": float(np.quantile(inner, 0.999))}
quantiles["candidates"] = int((prob > quantiles["json"]).sum())
json.dump({"prob": quantiles["json"], "nms": 0.3}, open(f"{folder}/tiny/thresholds.json", "w"))
print(json.dumps(quantiles))
"""


def kidney_crop() -> np.ndarray:
    path = require_shared("nuclei", "nuinsseg_kidney", "test", "images", "human_kidney_08.png")
    return np.asarray(Image.open(path).convert("RGB"))[:256, :256]


def run_python(code: str, *args: str, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, {"json": thresholds.json's prob, "given": a higher one, "candidates": positions above json})."""
    if not HAS_TENSORFLOW:
        pytest.fail("tensorflow and stardist must be installed to test StarDist: pip install -e '.[stardist]'")
    folder = tmp_path_factory.mktemp("stardist")
    image = require_shared("nuclei", "nuinsseg_kidney", "test", "images", "human_kidney_08.png")
    done = run_python(BUILD_TINY, str(folder), str(image))
    assert done.returncode == 0, done.stderr[-2000:]
    return folder / "tiny", json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def segmenter(tiny):
    model = sa.load(tiny[0])
    yield model
    model.close()


def check_valid(found, tile_shape, prob_thresh):
    n = found.count
    assert found.labels.shape == tile_shape and found.labels.dtype == np.int32
    assert np.array_equal(np.unique(found.labels), np.arange(n + 1))  # ids 1..n, all present, and background
    assert found.classes.shape == (n,) and not found.classes.any()  # the one class, "nucleus"
    assert found.scores.shape == (n,) and found.scores.dtype == np.float32
    assert np.all(found.scores >= prob_thresh) and np.all(found.scores <= 1)


@needs_tensorflow
@pytest.mark.shared
def test_a_model_folder_runs_in_its_own_process_and_gives_valid_objects(segmenter, tiny):
    quantiles = tiny[1]
    assert segmenter.prob_thresh == pytest.approx(quantiles["json"]) and segmenter.nms_thresh == 0.3
    assert (segmenter.kind, segmenter.classes, segmenter.device) == ("instance", ["nucleus"], "cpu")
    assert (segmenter.mpp, segmenter.tile_size, segmenter.overlap) == (0.5, 1024, 96)
    crop = kidney_crop()
    tiles = np.stack([crop, crop, crop[::-1]])
    first, again, flipped = segmenter.predict_instances(tiles)
    for found in (first, again, flipped):
        check_valid(found, (256, 256), segmenter.prob_thresh)
    assert 10 <= first.count < quantiles["candidates"]  # NMS keeps some of the candidates, not none and not all
    areas = np.bincount(first.labels.ravel())[1:]
    assert 30 <= np.median(areas) <= 60  # 8 rays of 4 px, in tile pixels: an octagon of 45 px2, drawn
    assert np.array_equal(first.labels, again.labels) and np.array_equal(first.scores, again.scores)
    assert not np.array_equal(first.labels, flipped.labels)  # each tile is its own, in order
    assert "tensorflow" not in sys.modules and "keras" not in sys.modules
    assert segmenter.worker.alive and segmenter.worker.pid != os.getpid()


@needs_tensorflow
@pytest.mark.shared
def test_given_thresholds_win_and_a_killed_worker_is_one_line(segmenter, tiny):
    folder, quantiles = tiny
    crop = kidney_crop()
    strict = sa.load(folder, prob_thresh=quantiles["given"], nms_thresh=0.5)
    try:
        assert strict.prob_thresh == pytest.approx(quantiles["given"]) and strict.nms_thresh == 0.5
        assert strict.fingerprint != segmenter.fingerprint and len(strict.fingerprint) == 16
        (found,) = strict.predict_instances(crop[None])
        check_valid(found, (256, 256), quantiles["given"])
        (loose,) = segmenter.predict_instances(crop[None])
        assert found.count < loose.count

        process = strict.worker.process
        threading.Timer(0.3, process.kill).start()
        start = time.monotonic()
        with pytest.raises(ModelError) as info:
            for _ in range(200):  # the kill lands mid-request (or between two): either way an error, no hang
                strict.predict_instances(np.stack([crop] * 4))
        assert time.monotonic() - start < 30
        message = str(info.value)
        assert "\n" not in message and "stopped (killed by SIGKILL" in message and "load the model again" in message
        with pytest.raises(ModelError, match="stopped"):
            strict.predict_instances(crop[None])
    finally:
        strict.close()
    with pytest.raises(ModelError, match="was closed"):
        strict.predict_instances(crop[None])


IMPORT_ORDER = """
import sys
import numpy as np
from napari_nephro.models import stardist_adapter as sa
model = sa.load(sys.argv[1])
(found,) = model.predict_instances(np.random.default_rng(0).integers(0, 256, (1, 128, 128, 3), dtype=np.uint8))
assert "tensorflow" not in sys.modules
import torch, torchvision, segmentation_models_pytorch
x = torchvision.ops.box_area(torch.tensor([[0.0, 0.0, 2.0, 3.0]]))
model.close()
print("ok", float(x[0]), found.labels.shape)
"""


@needs_tensorflow
@pytest.mark.shared
def test_torchvision_after_a_stardist_run_does_not_crash(tiny):
    done = run_python(IMPORT_ORDER, str(tiny[0]))
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.split()[:2] == ["ok", "6.0"]


def fake_folder(tmp_path, channels=3):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"n_dim": 2, "n_rays": 32, "n_channel_in": channels}))
    (folder / "weights_best.h5").write_bytes(b"not read here")
    return folder


NO_TENSORFLOW = """
import sys

class NoTensorFlow:  # as if tensorflow were not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            raise ModuleNotFoundError("No module named 'tensorflow'", name=name)
        return None

sys.meta_path.insert(0, NoTensorFlow())
"""
WITHOUT_TENSORFLOW = (
    NO_TENSORFLOW
    + """
from napari_nephro.models import stardist_adapter as sa
from napari_nephro.models.errors import ModelError
try:
    sa.load(sys.argv[1])
except ModelError as exc:
    print(exc)
"""
)


def test_without_tensorflow_the_error_is_the_pip_command(tmp_path):
    done = run_python(WITHOUT_TENSORFLOW, str(fake_folder(tmp_path)), timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "tensorflow" in lines[0] and 'pip install "napari-nephro[stardist]"' in lines[0]


def test_a_worker_without_tensorflow_says_the_same(tmp_path, monkeypatch):
    """The worker's own check (TensorFlow present here but not where the worker runs): same line, worker gone."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TENSORFLOW)  # Python imports it at start-up, the worker too
    monkeypatch.setenv("PYTHONPATH", str(blocker))
    folder = fake_folder(tmp_path)
    monkeypatch.setattr(sa, "_require_packages", lambda: None)  # as if this process had TensorFlow
    with pytest.raises(
        ModelError, match=r'^StarDist needs tensorflow, which is not installed: pip install "napari'
    ) as info:
        sa.load(folder)
    assert "\n" not in str(info.value)


def test_a_missing_pretrained_model_names_the_zip_and_where_to_unzip_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    for spec in (None, "2D_versatile_he"):
        with pytest.raises(ModelError) as info:
            sa.load(spec)
        message = str(info.value)
        assert "\n" not in message and sa.PRETRAINED_URL in message
        assert str(tmp_path / "keras" / "models" / "StarDist2D" / "2D_versatile_he") in message
    assert sa.PRETRAINED_URL.endswith("/v0.1/python_2D_versatile_he.zip")  # stardist.models' registered URL


@pytest.mark.parametrize("layout", ["", "2D_versatile_he", "2D_versatile_he_extracted"])
def test_the_pretrained_model_is_found_where_stardist_unzips_it(tmp_path, monkeypatch, layout):
    """Keras before 3.6 unzips into the cache folder itself; 3.6+ into *_extracted, which csbdeep links."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    folder = tmp_path / "models" / "StarDist2D" / "2D_versatile_he" / layout
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert sa.find_folder(None) == folder


def test_bad_folders_and_options_are_one_line(tmp_path):
    folder = fake_folder(tmp_path)
    cases = [
        (lambda: sa.load(folder, threshold=0.5), "unknown StarDist option.*valid ones are prob_thresh"),
        (lambda: sa.load(folder, prob_thresh=1.5), "prob_thresh must be between 0 and 1"),
        (lambda: sa.load(folder, overlap=1024), "overlap must be smaller"),
        (lambda: sa.load(folder, device="mps"), "no MPS"),
        (lambda: sa.load(folder / "weights_best.h5"), "a file; give the StarDist model folder"),
        (lambda: sa.load(tmp_path / "nowhere"), "no such folder"),
        (lambda: sa.load("2D_versatile_fluo"), "fluorescence"),
        (lambda: sa.load(fake_folder(tmp_path / "gray", channels=1)), "1-channel images; H&E tiles are RGB"),
    ]
    (tmp_path / "gray").mkdir()
    for call, reason in cases:
        with pytest.raises(ModelError, match=reason) as info:
            call()
        assert "\n" not in str(info.value)
    (folder / "weights_best.h5").unlink()
    with pytest.raises(ModelError, match=r"no weights_best.h5 or weights_last.h5"):
        sa.load(folder)
    (folder / "weights_last.h5").write_bytes(b"")
    assert sa.weights_in(folder).name == "weights_last.h5"
    (folder / "thresholds.json").write_text('{"prob": 0.6}')
    with pytest.raises(ModelError, match="no 'nms' threshold"):
        sa.load(folder)


def test_tiles_are_normalised_as_stardist_does_but_glass_is_not_blown_up():
    from napari_nephro.models._stardist_worker import normalise

    rng = np.random.default_rng(0)
    tissue = rng.integers(30, 250, (64, 64, 3), dtype=np.uint8)
    low, high = np.percentile(tissue.astype(np.float32), sa.PERCENTILES)  # all pixels and channels together
    out = normalise(tissue, sa.PERCENTILES, sa.MIN_RANGE)
    assert out.dtype == np.float32 and out.shape == tissue.shape
    assert np.allclose(out, (tissue - low) / (high - low), atol=1e-6)
    glass = rng.integers(225, 240, (64, 64, 3), dtype=np.uint8)  # 15 grey levels of noise
    assert np.ptp(normalise(glass, sa.PERCENTILES, sa.MIN_RANGE)) <= 15 / 64 + 1e-6
