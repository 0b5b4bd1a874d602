"""Prompt sets: examples cut around painted objects or annotations, saved, reopened, edited, refused when wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import require_shared
from napari_nephro.cli import main
from napari_nephro.io import open_slide
from napari_nephro.prompts import PromptError, PromptSet, examples_from_labels
from napari_nephro.tiling import read_scaled

CLASSES = ["normal", "segmental sclerosis", "global sclerosis"]


@pytest.fixture(scope="module")
def slide():
    return open_slide(require_shared("wsi", "CMU-1-Small-Region.svs"))  # 0.499 um/px


def painted(shape=(2967, 2220), downsample=4):
    """A painting over the slide at 1/4 resolution: a normal disc, a global sclerosis square, a stray speck."""
    labels = np.zeros((shape[0] // downsample, shape[1] // downsample), np.uint8)
    yy, xx = np.mgrid[: labels.shape[0], : labels.shape[1]]
    labels[(yy - 150) ** 2 + (xx - 200) ** 2 < 30**2] = 1  # centre level-0 (800, 600), 240 px = 120 um across
    labels[400:440, 300:360] = 3  # level-0 x 1200..1440, y 1600..1760
    labels[700, 500] = 2  # one pixel: a slip of the brush
    return labels


def test_painted_objects_become_centred_examples_at_the_sets_scale(slide):
    prompts = PromptSet(CLASSES, mpp=1.0, size=448)
    examples, skipped = examples_from_labels(slide, painted(), prompts, downsample=4)
    assert skipped == [] and [e.label for e in examples] == ["normal", "global sclerosis"]
    normal, sclerosis = examples
    side = 448 * 1.0 / slide.mpp  # level-0 pixels a 448 px crop at 1 um/px covers
    x, y, w, h = normal.location
    assert (w, h) == pytest.approx((side, side))
    assert (x + w / 2, y + h / 2) == pytest.approx((802, 602), abs=1)  # centred on the disc
    # the crop is the slide at 1 um/px, and the mask has the disc in its class at its size (120 um)
    np.testing.assert_array_equal(normal.image, read_scaled(slide, normal.location, (448, 448)))
    assert normal.mask[224, 224] == 1 and normal.mask[5, 5] == 0
    across = np.flatnonzero(normal.mask[224] == 1)
    assert across.size == pytest.approx(120, abs=4)
    assert set(np.unique(sclerosis.mask)) == {0, 3}
    for e in examples:
        assert prompts.add(e) is e
    assert prompts.counts() == {"normal": 1, "segmental sclerosis": 0, "global sclerosis": 1}
    again, _ = examples_from_labels(slide, painted(), prompts, downsample=4)
    assert [prompts.add(e) for e in again] == [None, None], "the same object added twice is one example"


def test_a_prompt_set_round_trips_through_its_folder(slide, tmp_path):
    prompts = PromptSet(CLASSES, mpp=1.0, size=448)
    for e in examples_from_labels(slide, painted(), prompts, downsample=4)[0]:
        prompts.add(e)
    folder = prompts.save(tmp_path / "prompts")
    index = json.loads((folder / "prompts.json").read_text())
    assert index["classes"] == CLASSES and index["mpp"] == 1.0 and len(index["examples"]) == 2
    mask_png = Image.open(folder / index["examples"][0]["mask"])
    assert mask_png.mode == "P", "masks are class ids with the class colours as palette"
    again = PromptSet.load(folder)
    assert again.fingerprint() == prompts.fingerprint()
    for a, b in zip(prompts.examples, again.examples, strict=True):
        assert (a.id, a.label, a.source) == (b.id, b.label, b.source)
        assert a.location == pytest.approx(b.location, abs=1e-3)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
    with pytest.raises(PromptError, match="already exists"):
        prompts.save(folder)
    (folder / "notes.txt").write_text("PAS, biopsy 12")
    prompts.remove(prompts.examples[0].id)
    prompts.save(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "PAS, biopsy 12", "the user's own files beside the set stay"
    assert len(PromptSet.load(folder)) == 1
    (tmp_path / "empty").mkdir()
    prompts.save(tmp_path / "empty")  # a folder just made for it (as a folder dialog does)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.docx").write_text("x")
    with pytest.raises(PromptError, match="not a prompt set"):
        prompts.save(tmp_path / "other", overwrite=True)


def test_edit_an_example_set(slide, tmp_path):
    prompts = PromptSet(CLASSES, mpp=1.0, size=448)
    for e in examples_from_labels(slide, painted(), prompts, downsample=4)[0]:
        prompts.add(e)
    first = prompts.examples[0].id
    prompts.get(first).mask[:20, :20] = 1  # another normal glomerulus at the crop's corner
    prompts.relabel(first, "segmental sclerosis")
    assert prompts.get(first).label == "segmental sclerosis" and prompts.get(first).mask[224, 224] == 2
    assert prompts.get(first).mask[5, 5] == 1, "only the example's own object changes class"
    before = prompts.fingerprint()
    prompts.remove(first)
    assert len(prompts) == 1 and prompts.fingerprint() != before
    prompts.rename_class("global sclerosis", "GS")
    assert prompts.examples[0].label == "GS"
    with pytest.raises(PromptError, match="no example 'zzz'"):
        prompts.remove("zzz")
    with pytest.raises(PromptError, match="not in this prompt set"):
        prompts.relabel(prompts.examples[0].id, "crescent")


def test_painting_mistakes_are_one_line_errors(slide):
    prompts = PromptSet(CLASSES, mpp=1.0, size=448)
    with pytest.raises(PromptError, match="nothing is painted"):
        examples_from_labels(slide, np.zeros((100, 100), np.uint8), prompts)
    labels = np.zeros((700, 500), np.uint8)
    labels[10:20, 10:20] = 5
    with pytest.raises(PromptError, match=r"label value\(s\) 5 have no class"):
        examples_from_labels(slide, labels, prompts, downsample=4)
    big = np.zeros((700, 500), np.uint8)
    big[100:400, 100:400] = 1  # 1200 level-0 px = 600 um, more than a 448 um crop
    examples, skipped = examples_from_labels(slide, big, prompts, downsample=4)
    assert examples == [] and "more than a crop" in skipped[0]
    with pytest.raises(PromptError, match="empty"):
        prompts.check_usable()
    with pytest.raises(PromptError, match="distinct"):
        PromptSet(["a", "a"])


def test_a_damaged_prompt_folder_is_refused(slide, tmp_path):
    with pytest.raises(PromptError, match="not a prompt set"):
        PromptSet.load(tmp_path)
    prompts = PromptSet(CLASSES, mpp=1.0, size=448)
    for e in examples_from_labels(slide, painted(), prompts, downsample=4)[0]:
        prompts.add(e)
    folder = prompts.save(tmp_path / "p")
    Image.fromarray(np.zeros((448, 448), np.uint8)).save(folder / "examples" / "001_mask.png")
    with pytest.raises(PromptError, match="no 'normal' pixels"):
        PromptSet.load(folder)
    index = json.loads((folder / "prompts.json").read_text())
    for damage in ({"version": "x"}, {"examples": ["001"]}):
        (folder / "prompts.json").write_text(json.dumps({**index, **damage}))
        with pytest.raises(PromptError, match="not a valid prompt index"):
            PromptSet.load(folder)
    (folder / "prompts.json").write_text(json.dumps(index))
    (folder / "examples" / "002.png").unlink()
    (folder / "examples" / "001_mask.png").unlink()
    with pytest.raises(PromptError, match="example 001 cannot be read"):
        PromptSet.load(folder)


BUPT = ("glomeruli", "bupt_multistain_dev")
BUPT_MAP = ["--map", "gn=normal", "gs=global sclerosis", "gl=ignore", "gm=ignore"]


def test_cli_builds_a_prompt_set_from_coco_annotations(tmp_path, capsys):
    data = require_shared(*BUPT)
    folder = tmp_path / "bupt"
    common = ["--images", str(data / "images"), "--image-mpp", "0.5", "--mpp", "2"]
    args = ["prompts", "add", str(folder), str(data / "annotations.json"), *common]
    assert main([*args, "--classes", "normal", "global sclerosis", *BUPT_MAP, "--per-class", "2"]) == 0
    prompts = PromptSet.load(folder)
    assert prompts.counts() == {"normal": 2, "global sclerosis": 2} and prompts.mpp == 2
    for e in prompts.examples:  # each crop is centred on an object of its class
        assert e.mask[224, 224] == prompts.class_id(e.label) or (e.mask == prompts.class_id(e.label)).sum() > 500
    assert main(["prompts", "list", str(folder)]) == 0
    listing = capsys.readouterr().out
    assert "4 examples (normal: 2, global sclerosis: 2)" in listing and ".jpg" in listing.lower()
    assert main(["prompts", "remove", str(folder), prompts.examples[0].id]) == 0
    assert len(PromptSet.load(folder)) == 3


def test_cli_prompt_mistakes(tmp_path, capsys):
    data = require_shared(*BUPT)
    folder = tmp_path / "bupt"
    args = ["prompts", "add", str(folder), str(data / "annotations.json"), "--images", str(data / "images")]
    assert main([*args, "--image-mpp", "0.5", "--classes", "normal", "global sclerosis", "--map", "gn=normal"]) == 2
    err = capsys.readouterr().err
    assert "gl, gm, gs" in err and "--map" in err and "Traceback" not in err
    assert not folder.exists(), "a failed add leaves nothing behind"
    assert main([*args, "--classes", "normal", "global sclerosis", *BUPT_MAP]) == 2
    assert "pixel size is unknown" in capsys.readouterr().err
    assert main([*args, "--image-mpp", "0.5", "--mpp", "2", "--per-class", "1", *BUPT_MAP]) == 0
    capsys.readouterr()
    assert main([*args, "--image-mpp", "0.5", "--mpp", "1", "--per-class", "1", *BUPT_MAP]) == 2
    assert "cut at 2 um/px" in capsys.readouterr().err
    assert main(["prompts", "relabel", str(folder), "001", "crescent"]) == 2
    assert "not in this prompt set" in capsys.readouterr().err
