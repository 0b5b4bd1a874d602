"""SegGPT through transformers: the real architecture at toy size with random weights (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import require_shared, tiny_seggpt
from napari_nephro.annotations.omezarr import read_label_zarr
from napari_nephro.cli import main
from napari_nephro.inference import segment_region
from napari_nephro.inference.plan import cells
from napari_nephro.io import open_slide
from napari_nephro.models import ModelError
from napari_nephro.models import seggpt as seggpt_module
from napari_nephro.models.seggpt import SegGptSegmenter, load_seggpt
from napari_nephro.prompts import Example, PromptError, PromptSet, examples_from_labels

CLASSES = ["normal", "segmental sclerosis", "global sclerosis"]


def synthetic_prompts(counts: dict[str, int], size: int = 48, seed: int = 0) -> PromptSet:
    rng = np.random.default_rng(seed)
    prompts = PromptSet(CLASSES, mpp=1.0, size=size)
    for label, n in counts.items():
        for _ in range(n):
            mask = np.zeros((size, size), np.uint8)
            y, x = rng.integers(4, size // 2, 2)
            mask[y : y + size // 3, x : x + size // 3] = prompts.class_id(label)
            image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            prompts.add(Example(image, mask, label, "synthetic", (float(rng.random() * 1e4), 0.0, size, size)))
    return prompts


@pytest.fixture(scope="module")
def tiny():
    return tiny_seggpt()


def test_the_ensemble_per_tile_is_transformers_feature_ensemble(tiny):
    """Batching tiles x prompts must give, tile by tile, what SegGPT's own feature ensemble gives."""
    model, processor = tiny
    prompts = synthetic_prompts({"normal": 3})
    segmenter = SegGptSegmenter(model, processor, prompts, pairs_per_batch=16)
    tiles = np.random.default_rng(1).integers(0, 255, (3, 48, 48, 3), dtype=np.uint8)
    _, prompt_pixels, prompt_masks, _ = segmenter._groups[0]
    pixels = processor(images=list(tiles), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        batched = segmenter._paint(pixels, prompt_pixels, prompt_masks, 1)
        for i in range(3):
            reference = model(
                pixel_values=pixels[i : i + 1].repeat(3, 1, 1, 1),
                prompt_pixel_values=prompt_pixels,
                prompt_masks=prompt_masks,
                feature_ensemble=True,
            ).pred_masks[:1]
            reference = reference[:, :, reference.shape[2] // 2 :]
            torch.testing.assert_close(batched[i : i + 1], segmenter._distances(reference, 1), rtol=1e-4, atol=1e-2)
    one_at_a_time = SegGptSegmenter(model, processor, prompts, pairs_per_batch=1).predict(tiles)
    np.testing.assert_allclose(segmenter.predict(tiles), one_at_a_time, atol=1e-5)
    # attention in slices of samples (bounded memory on a CPU) is the same computation
    whole = SegGptSegmenter(model, processor, prompts, pairs_per_batch=16, attention_chunk=None).predict(tiles)
    sliced = SegGptSegmenter(model, processor, prompts, pairs_per_batch=16, attention_chunk=1).predict(tiles)
    np.testing.assert_allclose(whole, sliced, atol=1e-5)


@pytest.mark.parametrize("mode", ["per_class", "palette"])
def test_one_or_several_prompts_give_class_probabilities(tiny, mode):
    model, processor = tiny
    tiles = np.random.default_rng(2).integers(0, 255, (2, 40, 56, 3), dtype=np.uint8)
    for counts in ({"normal": 1}, {"normal": 2, "segmental sclerosis": 2, "global sclerosis": 2}):
        segmenter = SegGptSegmenter(model, processor, synthetic_prompts(counts), mode=mode)
        assert segmenter.prompt_count == sum(counts.values())
        out = segmenter.predict(tiles)
        assert out.shape == (2, 4, 40, 56) and out.dtype == np.float32  # background + 3 classes, at tile size
        np.testing.assert_allclose(out.sum(axis=1), 1, atol=1e-4)
        assert (out >= 0).all()


def test_a_class_without_examples_is_never_predicted(tiny):
    model, processor = tiny
    segmenter = SegGptSegmenter(model, processor, synthetic_prompts({"normal": 2}))
    assert segmenter.missing_classes() == ["segmental sclerosis", "global sclerosis"]
    out = segmenter.predict(np.random.default_rng(3).integers(0, 255, (2, 48, 48, 3), dtype=np.uint8))
    assert set(np.unique(out.argmax(axis=1))) <= {0, 1}
    assert not out[:, 2:].any()


def test_a_pixel_is_foreground_only_when_some_class_paints_it(tiny, monkeypatch):
    """Per class: two classes each painting a pixel 40 % sure leave it background, as one class would."""
    from napari_nephro.inference.stitch import to_labels

    model, processor = tiny
    segmenter = SegGptSegmenter(model, processor, synthetic_prompts({"normal": 1, "global sclerosis": 1}))
    temperature = segmenter._temperature()
    sureness = {1: [0.4, 0.6, 0.3], 3: [0.4, 0.2, 0.55]}  # of three pixels (rows 0 to 2)

    def paint(pixels, prompt_pixels, prompt_masks, labels):
        class_id = 1 if prompt_masks is segmenter._groups[0][2] else 3
        p = torch.full((32, 32), 0.1)
        p[:3] = torch.tensor(sureness[class_id]).view(3, 1)
        distances = torch.zeros(len(pixels), 2, 32, 32)
        distances[:, 1] = temperature * torch.log(1 / p - 1)  # softmax(-d / T) gives p for the class
        return distances

    monkeypatch.setattr(segmenter, "_paint", paint)
    probs = segmenter.predict(np.zeros((1, 32, 32, 3), np.uint8))[0]
    np.testing.assert_allclose(probs.sum(axis=0), 1, atol=1e-5)
    np.testing.assert_allclose(1 - probs[0, :3, 0], [0.4, 0.6, 0.55], atol=1e-4)  # foreground = the surest class
    assert list(to_labels(probs)[:3, 0]) == [0, 1, 3]


def test_one_class_gives_one_foreground_channel(tiny):
    model, processor = tiny
    prompts = PromptSet(["glomerulus"], mpp=1.0, size=48)
    mask = np.zeros((48, 48), np.uint8)
    mask[10:30, 10:30] = 1
    prompts.add(Example(np.full((48, 48, 3), 200, np.uint8), mask, "glomerulus", "x", (0, 0, 48, 48)))
    out = SegGptSegmenter(model, processor, prompts).predict(np.zeros((1, 48, 48, 3), np.uint8))
    assert out.shape == (1, 1, 48, 48) and 0 <= out.min() <= out.max() <= 1


def test_weights_in_a_folder_load_without_code_change(tmp_path):
    folder = tmp_path / "seggpt-vit-large"
    tiny_seggpt(folder)
    prompts = synthetic_prompts({"normal": 2})
    segmenter = SegGptSegmenter.load(folder, prompts, device="cpu")
    assert segmenter.input_size == 32 and segmenter.tile_size == 48 and segmenter.mpp == 1.0
    other = SegGptSegmenter.load(folder, synthetic_prompts({"normal": 2}, seed=5), device="cpu")
    assert other.fingerprint != segmenter.fingerprint, "a resumed run must notice other prompts"
    assert segmenter.seconds_per_tile() < 1, "the estimate scales with the network's size"


def test_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="hf download BAAI/seggpt-vit-large"):
        load_seggpt(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a SegGPT folder"):
        load_seggpt(tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(seggpt_module, "_online", lambda host, timeout=3.0: False)
    with pytest.raises(ModelError, match=r"huggingface.co cannot be reached.*--model seggpt:PATH"):
        load_seggpt(None)
    with pytest.raises(PromptError, match="empty"):  # said before any weights are looked for
        SegGptSegmenter.load(None, PromptSet(CLASSES))


@pytest.fixture(scope="module")
def seggpt_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights") / "seggpt"
    tiny_seggpt(folder)
    return folder


@pytest.fixture(scope="module")
def cmu_prompts(tmp_path_factory):
    """Two painted glomerulus-sized objects on the real slide, 96 px crops at 2 um/px."""
    slide = open_slide(require_shared("wsi", "CMU-1-Small-Region.svs"))
    labels = np.zeros((742, 555), np.uint8)
    labels[100:130, 100:130] = 1
    labels[400:420, 300:330] = 3
    prompts = PromptSet(CLASSES, mpp=2.0, size=96)
    for e in examples_from_labels(slide, labels, prompts, downsample=4)[0]:
        prompts.add(e)
    return prompts.save(tmp_path_factory.mktemp("prompts") / "cmu")


def test_a_region_through_the_engine_gives_class_labels(seggpt_folder, cmu_prompts):
    slide = open_slide(require_shared("wsi", "CMU-1-Small-Region.svs"))
    segmenter = SegGptSegmenter.load(seggpt_folder, PromptSet.load(cmu_prompts), device="cpu")
    result = segment_region(slide, segmenter, (200, 300, 900, 700))
    assert result.array.shape == (700, 900) and result.array.dtype == np.uint8
    assert set(np.unique(result.array)) <= {0, 1, 3}, "only classes with examples"
    assert result.classes == {1: "normal", 2: "segmental sclerosis", 3: "global sclerosis"}
    assert result.stats.complete and result.stats.predicted > 1


def test_cli_segments_with_seggpt_and_shows_the_cost_first(seggpt_folder, cmu_prompts, tmp_path, capsys):
    slide = require_shared("wsi", "CMU-1-Small-Region.svs")
    out = tmp_path / "seggpt.zarr"
    args = ["segment", str(slide), "--model", f"seggpt:{seggpt_folder}", "--prompts", str(cmu_prompts)]
    assert main([*args, "--region", "0,0,1200,900", "--out", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "tissue tiles x 2 prompts" in err and "'segmental sclerosis' has no example" in err
    labels = read_label_zarr(out)
    assert labels.classes == {1: "normal", 2: "segmental sclerosis", 3: "global sclerosis"}
    assert labels.slide_shape == (2967, 2220)  # the whole slide, at the prompts' scale
    assert labels.levels[0].shape == tuple(cells(n, labels.slide_downsample) for n in labels.slide_shape)


def test_cli_seggpt_mistakes(seggpt_folder, cmu_prompts, tmp_path, capsys):
    slide = require_shared("wsi", "CMU-1-Small-Region.svs")
    out = ["--out", str(tmp_path / "x.zarr")]
    assert main(["segment", str(slide), "--model", "seggpt", *out]) == 2
    assert "give --prompts" in capsys.readouterr().err
    seg = ["segment", str(slide), "--model", f"seggpt:{seggpt_folder}", "--prompts", str(cmu_prompts), *out]
    assert main([*seg, "--tile", "512"]) == 2
    assert "drop --tile" in capsys.readouterr().err
    PromptSet(CLASSES).save(tmp_path / "empty")
    assert main([*seg[:-4], "--prompts", str(tmp_path / "empty"), *out]) == 2
    assert "prompt set is empty" in capsys.readouterr().err
    assert main(["segment", str(slide), "--model", "default", "--prompts", str(cmu_prompts), *out]) == 2
    assert "--prompts is for SegGPT" in capsys.readouterr().err
    assert not (tmp_path / "x.zarr").exists()
