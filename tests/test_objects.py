"""Whole objects from a pixel map: holes, specks, touching glomeruli, whole-slide bands, resume, and the summary."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from conftest import require_shared, write_pyramid
from napari_nephro.annotations.omezarr import read_label_zarr
from napari_nephro.cli import main
from napari_nephro.inference import SegmentError, segment_region, segment_slide
from napari_nephro.inference.object_sink import STATE_KEY, ArrayCollector, ObjectSink
from napari_nephro.inference.objects import ObjectRules, clean_labels, clean_with_summary
from napari_nephro.inference.summary import ObjectSummary, summarize
from napari_nephro.io import open_slide
from napari_nephro.models import ModelConfig, ModelError

GLOMERULI = {1: "glomerulus"}


def disc(shape, y, x, r) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - y) ** 2 + (xx - x) ** 2 <= r * r


def objects_of(labels: np.ndarray, cls: int = 1) -> tuple[np.ndarray, int]:
    """Connected components, as GeoJSON export and Compare see them."""
    return ndimage.label(labels == cls)


# -- one object at a time -------------------------------------------------------------------
def test_holes_are_filled_but_an_object_inside_a_hole_stays_its_own():
    labels = np.zeros((400, 400), np.uint8)
    labels[disc(labels.shape, 200, 200, 150)] = 1
    labels[disc(labels.shape, 200, 200, 60)] = 0  # a hole of any size, fully enclosed
    labels[disc(labels.shape, 120, 200, 8)] = 0  # and a small one
    labels[disc(labels.shape, 200, 200, 30)] = 1  # an island in the big hole
    out = clean_labels(labels, 1.0, ObjectRules(min_area_um2=100, split_touching=False))
    assert out[200, 260] == 1 and out[120, 200] == 1  # the holes are object now
    pieces, n = objects_of(out)
    assert n == 2, "the island must not merge with the ring it sat in"
    assert pieces[200, 200] != pieces[200, 300]


@pytest.mark.parametrize("mpp", [0.5, 2.0])
def test_pieces_below_the_minimum_area_in_um2_are_dropped_at_any_pixel_size(mpp):
    rules = ObjectRules(min_area_um2=2000, smooth_um=0, split_touching=False)
    min_px = 2000 / mpp**2
    small, large = math.floor(math.sqrt(0.9 * min_px)), math.ceil(math.sqrt(1.1 * min_px))
    labels = np.zeros((3 * large, 3 * large), np.uint8)
    labels[5 : 5 + small, 5 : 5 + small] = 1
    labels[-5 - large : -5, -5 - large : -5] = 1
    out = clean_labels(labels, mpp, rules)
    expected = np.zeros_like(labels)
    expected[-5 - large : -5, -5 - large : -5] = 1
    assert np.array_equal(out, expected), "0.9 x the minimum area is noise, 1.1 x it is kept as it was"


def test_two_touching_glomeruli_become_two_objects_and_one_large_one_stays_whole():
    mpp = 1.0
    shape = (700, 700)
    labels = np.zeros(shape, np.uint8)
    labels[disc(shape, 150, 150, 80) | disc(shape, 150, 300, 80)] = 1  # overlapping by 10 um
    labels[disc(shape, 480, 300, 120)] = 1  # a large glomerulus, 240 um across
    out = clean_labels(labels, mpp, ObjectRules())
    pieces, n = objects_of(out)
    assert n == 3
    left, right, big = pieces[150, 110], pieces[150, 340], pieces[480, 300]
    assert len({left, right, big}) == 3 and 0 not in {left, right, big}
    # a line of background between the two: not even diagonal neighbours
    assert not (ndimage.binary_dilation(pieces == left, np.ones((3, 3))) & (pieces == right)).any()
    # each keeps nearly its own disc
    assert np.sum(pieces == left) == pytest.approx(np.sum(disc(shape, 150, 150, 80)), rel=0.08)
    assert np.sum(pieces == big) == pytest.approx(np.sum(disc(shape, 480, 300, 120)), rel=0.03)


def test_an_elongated_glomerulus_is_not_split():
    shape = (400, 500)
    yy, xx = np.indices(shape)
    labels = ((yy - 200) ** 2 / 70**2 + (xx - 250) ** 2 / 160**2 <= 1).astype(np.uint8)
    assert objects_of(clean_labels(labels, 1.0, ObjectRules()))[1] == 1


def test_smoothing_removes_a_spur_and_keeps_the_shape():
    shape = (300, 300)
    labels = disc(shape, 150, 150, 90).astype(np.uint8)
    labels[148:151, 240:290] = 1  # a 3-px spur sticking out 50 px
    out = clean_labels(labels, 1.0, ObjectRules(smooth_um=3.0))
    assert not out[140:160, 250:290].any()
    assert np.sum(out) == pytest.approx(np.sum(disc(shape, 150, 150, 90)), rel=0.02)


def test_classes_are_cleaned_separately_and_never_overwrite_each_other():
    shape = (300, 400)
    labels = np.zeros(shape, np.uint8)
    labels[disc(shape, 150, 120, 90)] = 1
    labels[disc(shape, 150, 275, 70)] = 2  # touching the class-1 object
    labels[disc(shape, 150, 120, 30)] = 2  # a class-2 object in a class-1 hole
    out = clean_labels(labels, 1.0, ObjectRules(min_area_um2=500))
    assert out[150, 120] == 2 and out[150, 275] == 2 and out[150, 60] == 1
    assert objects_of(out, 2)[1] == 2 and objects_of(out, 1)[1] == 1


def random_blobs(shape=(1500, 700), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    labels = np.zeros(shape, np.uint8)
    for _ in range(40):
        y, x, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(3, 70)
        labels[(yy - y) ** 2 + ((xx - x) * rng.uniform(0.5, 1.5)) ** 2 <= r * r] = rng.integers(1, 3)
    labels[rng.random(shape) < 0.01] = 1
    labels[rng.random(shape) < 0.02] = 0
    return labels


class ChunkedSink(ArrayCollector):
    """A sink whose durable progress only moves at multiples of 200 rows (as zarr chunk rows), with the record hook."""

    def __init__(self, shape, start=0, array=None):
        super().__init__(shape, array)
        self.rows_done = self.written = start
        self.extra, self.record = None, {}

    def write(self, y, rows):
        assert y == self.written, "rows must come in order, each once"
        self.array[y : y + len(rows)] = rows
        self.written = y + len(rows)
        if self.written // 200 * 200 > self.rows_done:
            self._step(self.written // 200 * 200)

    def flush(self):
        if self.written > self.rows_done:
            self._step(self.written)

    def _step(self, rows_done):
        self.rows_done = rows_done
        self.record = {"rows_done": rows_done, **(self.extra(rows_done) if self.extra else {})}


def feed(sink: ObjectSink, labels: np.ndarray, stop: int, rng) -> None:
    y = sink.rows_done
    while y < stop:
        n = int(rng.integers(1, 130))
        sink.write(y, labels[y : y + n])
        y += n
    sink.flush()


@pytest.mark.parametrize("rules", [ObjectRules(min_area_um2=300, split_min_um=20), None], ids=["rules", "count only"])
def test_bands_of_any_height_and_an_interrupted_stream_give_the_whole_array_result(rules):
    labels, classes = random_blobs(), {1: "glomerulus", 2: "sclerosed"}
    whole, summary = clean_with_summary(labels, 1.0, rules, classes)
    assert summary.count == objects_of(whole, 1)[1] + objects_of(whole, 2)[1]  # exact, objects across bands too
    rng = np.random.default_rng(1)
    for _ in range(3):
        first = ChunkedSink(labels.shape)
        sink = ObjectSink(first, rules, 1.0, len(labels), classes=classes)
        first.extra = lambda done, sink=sink: {STATE_KEY: sink.state(done)}
        feed(sink, labels, int(rng.integers(300, 1300)), rng)  # cancelled here
        second = ChunkedSink(labels.shape, first.rows_done, first.array.copy())
        second.array[first.rows_done :] = 0  # what was not durable is lost
        resumed = ObjectSink(second, rules, 1.0, len(labels), classes=classes, state=first.record.get(STATE_KEY))
        second.extra = lambda done, sink=resumed: {STATE_KEY: sink.state(done)}
        assert resumed.rows_done < first.rows_done or first.rows_done == 0
        feed(resumed, labels, len(labels), rng)
        assert np.array_equal(second.array, whole)
        if rules is not None:  # cleaned objects are recomputed whole: the summary is the same to the pixel
            assert resumed.summary().to_state() == summary.to_state()
        else:  # counted only, an object across the restart row is measured from its part below it
            assert abs(resumed.summary().count - summary.count) <= 2


def test_without_rules_the_labels_pass_unchanged_and_the_count_matches_summarize():
    labels = random_blobs(seed=3)
    out, summary = clean_with_summary(labels, 0.5, None, GLOMERULI)
    assert np.array_equal(out, labels)
    assert summary.to_state() == summarize(labels, 0.5, GLOMERULI).to_state()


# -- whole-slide runs --------------------------------------------------------------------------
SLIDE_MPP = 0.5
RULES = ObjectRules(min_area_um2=500, split_min_um=20, smooth_um=1.0)
# (y, x, r) in level-0 pixels; the row-1024 band edge of the label store runs through several
BLOBS = [(1024, 200, 70), (1024, 330, 70), (1020, 620, 90), (400, 400, 60), (1700, 300, 80), (2150, 600, 50)]


def blob_truth(shape=(2400, 800)) -> np.ndarray:
    truth = np.zeros(shape, bool)
    for y, x, r in BLOBS:
        truth |= disc(shape, y, x, r)
    truth &= ~disc(shape, 1020, 620, 40)  # a hole across the band edge
    return truth


@pytest.fixture(scope="module")
def blob_slide(tmp_path_factory) -> Path:
    """Pink tissue with dark blobs (two touching, one with a hole), specks, on a 3-level OME-TIFF."""
    shape = (2400, 800)
    rgb = np.full((*shape, 3), (225, 160, 200), np.uint8)
    rgb[blob_truth(shape)] = (70, 30, 90)
    for y, x in [(300, 100), (800, 700), (1500, 650), (2300, 100)]:
        rgb[y : y + 4, x : x + 4] = (70, 30, 90)  # specks
    levels = [rgb]
    for _ in range(2):
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((w // 2, h // 2), Image.Resampling.BOX)))
    return write_pyramid(tmp_path_factory.mktemp("blobs") / "blobs.ome.tif", levels, "ome", mpp=SLIDE_MPP)


class Darkness:
    """A 'model' whose foreground is the dark pixels, with object rules as a checkpoint would carry them."""

    kind, fingerprint, classes = "semantic", "darkness", ["glomerulus"]

    def __init__(self, objects=RULES, cancel_after=None):
        self.mpp, self.tile_size, self.input_size, self.overlap = 1.0, 128, 128, 32
        self.objects, self.calls, self.cancel_after = objects, 0, cancel_after

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        self.calls += 1
        return ((255 - tiles.mean(axis=-1)) / 255 > 0.5).astype(np.float32)[:, None]

    def cancelled(self) -> bool:
        return self.cancel_after is not None and self.calls >= self.cancel_after


def test_a_whole_slide_run_cleans_objects_across_bands_exactly_as_a_region_in_memory(blob_slide, tmp_path):
    slide = open_slide(blob_slide)
    region = segment_region(slide, Darkness())
    raw = segment_region(slide, Darkness(), objects=None)
    assert raw.array[300:304, 100:104].any() and not region.array[300:304, 100:104].any()  # specks dropped
    assert region.array[1020, 620] == 1 and raw.array[1020, 620] == 0  # the hole across the band edge filled
    result = segment_slide(slide, Darkness(), tmp_path / "blobs.zarr", out_downsample="full")  # bands of 1024 rows
    labels = np.asarray(read_label_zarr(result.path).levels[0])
    assert np.array_equal(labels, region.array)
    pieces, n = objects_of(labels)
    assert n == len(BLOBS)  # the touching pair split in two, nothing else
    assert pieces[1024, 180] != pieces[1024, 350]
    assert result.summary.count == region.summary.count == n
    assert result.summary.describe().startswith("6 glomeruli found")
    assert STATE_KEY not in json.loads((result.path / ".zattrs").read_text())["napari-nephro-run"]


def test_a_killed_run_with_objects_resumes_to_the_same_labels_and_summary(blob_slide, tmp_path, monkeypatch):
    """Killed with rows 0-1023 on disk and objects across row 1024: the resume recomputes those objects whole."""
    from napari_nephro.inference import output

    slide = open_slide(blob_slide)
    full = {"out_downsample": "full", "batch_size": 2}  # killed at level-0 row 1024, across objects
    reference = segment_slide(slide, Darkness(), tmp_path / "ref.zarr", **full)
    out = tmp_path / "run.zarr"
    model = Darkness(cancel_after=20)
    monkeypatch.setattr(output.ZarrRunStore, "flush", lambda self: None)  # killed: what was buffered is lost
    first = segment_slide(slide, model, out, cancel=model.cancelled, **full)
    monkeypatch.undo()
    assert first.path is None and first.rows_done == 1024
    state = json.loads((first.partial / ".zattrs").read_text())["napari-nephro-run"][STATE_KEY]
    assert state["rows_done"] == 1024 and state["restart"] < 1020 - 90, "objects across row 1024 restart whole"
    with pytest.raises(SegmentError, match="different object_rules"):
        segment_slide(slide, Darkness(objects=None), out, resume=True, **full)
    finished = segment_slide(slide, Darkness(), out, resume=True, **full)
    assert finished.path == out
    expected = np.asarray(read_label_zarr(reference.path).levels[0])
    assert np.array_equal(np.asarray(read_label_zarr(out).levels[0]), expected)
    assert finished.summary.to_state() == reference.summary.to_state()


# -- the summary ------------------------------------------------------------------------------
def test_the_summary_counts_and_describes_the_objects():
    labels = np.zeros((600, 600), np.uint8)
    labels[disc(labels.shape, 100, 100, 40)] = 1
    labels[disc(labels.shape, 300, 300, 80)] = 1
    labels[disc(labels.shape, 500, 500, 60)] = 1
    summary = summarize(labels, 1.0, GLOMERULI)
    assert summary.counts == {1: 3} and summary.count == 3
    assert summary.min_um2 == np.sum(disc(labels.shape, 100, 100, 40))
    assert summary.max_um2 == np.sum(disc(labels.shape, 300, 300, 80))
    assert summary.median_um2 == pytest.approx(np.sum(disc(labels.shape, 500, 500, 60)), rel=0.02)
    assert summary.describe() == "3 glomeruli found, 5,000 to 20,000 µm² (median 11,000)"
    assert summary.warning() is None
    assert summarize(np.zeros((10, 10), np.uint8), 1.0, GLOMERULI).describe() == "no glomeruli found"
    below = (np.indices(labels.shape)[0] >= 400) + 1
    two = summarize(np.where(labels == 1, below, 0).astype(np.uint8), 1.0, {1: "normal", 2: "sclerosed"})
    assert two.describe().startswith("3 objects found (2 normal, 1 sclerosed), 5,000 to 20,000")


def plausible(**changes) -> ObjectSummary:
    summary = ObjectSummary(GLOMERULI, 0.5, tissue_um2=20e6, slide_mpp=0.5, reference=ObjectRules())
    summary.add(1, [int(20000 / 0.25)] * 40)  # 40 glomeruli of 20,000 um² on 20 mm² of tissue
    for key, value in changes.items():
        setattr(summary, key, value)
    return summary


def test_a_plausible_result_gives_no_warning_and_implausible_ones_one_line_each():
    assert plausible().warning() is None
    over = plausible(tissue_um2=2e6)  # the same 0.8 mm² of glomeruli on 2 mm² of tissue: 40 %
    assert "40% of the tissue" in over.warning() and "pixel size (0.5 µm/px)" in over.warning()
    many = plausible()
    many.add(1, [int(3000 / 0.25)] * 1500)
    assert "1,540 objects" in many.warning()
    huge = plausible()
    huge.add(1, [int(400_000 / 0.25)])
    assert "400,000 µm²" in huge.warning()
    specks = plausible(small=5000, small_dropped=True)
    assert "5,000 of 5,040 pieces are under 2,000 µm²" in specks.warning()
    for summary in (over, many, huge, specks):
        assert "\n" not in summary.warning()
    unknown = plausible(reference=None, tissue_um2=2e6)  # a nuclei model: what is plausible is not known
    assert unknown.warning() is None


def test_the_summary_of_a_label_image_without_rules_knows_glomeruli_but_not_other_classes():
    rng = np.random.default_rng(0)
    specks = (rng.random((400, 400)) < 0.05).astype(np.uint8)
    assert "pieces are under" in summarize(specks, 0.5, GLOMERULI).warning()
    assert summarize(specks, 0.5, {1: "nucleus"}).warning() is None


# -- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"min_area": 2000}, "unknown rules min_area"),
        ({"min_area_um2": float("nan")}, "min_area_um2 must be a finite number"),
        ({"smooth_um": -1}, "smooth_um must be a finite number of at least 0"),
        ({"split_min_um": "40"}, "split_min_um must be a finite number"),
        ({"fill_holes": 1}, "fill_holes must be true or false"),
        ({"smooth_um": 2000}, "smooth_um must be at most 50"),  # a typo for 2.0: margins of GiB
        ({"split_min_um": 4e4}, "split_min_um must be at most 1000"),
        ({"min_area_um2": 3e5}, "is larger than max_area_um2"),
        ([2000], "objects must be a JSON object"),
    ],
)
def test_bad_object_rules_are_refused_in_one_line(value, reason, tmp_path):
    with pytest.raises(ModelError, match=reason):
        ObjectRules.from_config(value)
    (tmp_path / "config.json").write_text(json.dumps({"arch": "unet", "objects": value}, allow_nan=True))
    with pytest.raises(ModelError) as caught:
        ModelConfig.from_file(tmp_path / "config.json")
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_rules_round_trip_through_config_json_and_reach_the_segmenter(tmp_path):
    from napari_nephro.models import TorchSegmenter, build_network, save_checkpoint

    assert ObjectRules.from_config(None) is None and ObjectRules.from_config({}) == ObjectRules()
    config = ModelConfig("unet", encoder="resnet18", input_size=64, objects={"min_area_um2": 1500, "smooth_um": 0})
    assert config.objects == ObjectRules(min_area_um2=1500, smooth_um=0).to_config()
    folder = save_checkpoint(build_network(config), config, tmp_path / "ckpt")
    assert json.loads((folder / "config.json").read_text())["objects"]["min_area_um2"] == 1500
    segmenter = TorchSegmenter.from_checkpoint(folder, device="cpu")
    assert segmenter.objects == ObjectRules(min_area_um2=1500, smooth_um=0)
    plain = ModelConfig("unet", encoder="resnet18", input_size=64)
    assert "objects" not in json.loads(plain.to_json())  # older versions still read it
    assert TorchSegmenter(build_network(plain), plain).objects is None


# -- the command line -----------------------------------------------------------------------
def found_line(n: int) -> str:
    """How the summary starts for n objects of the class glomerulus."""
    return "no glomeruli found" if n == 0 else f"{n:,} {'glomerulus' if n == 1 else 'glomeruli'} found"


def painting_model(folder: Path) -> Path:
    """The shipped network with its output bias raised: it marks most tissue glomerulus, as a model on the
    wrong slide (or at the wrong pixel size) does."""
    import torch
    from safetensors.torch import load_file, save_file

    from napari_nephro.models.checkpoint import DEFAULT_FOLDER

    shutil.copytree(DEFAULT_FOLDER, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["segmentation_head.0.bias"] = weights["segmentation_head.0.bias"] + torch.tensor(8.0)
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def test_segment_prints_what_it_found_and_warns_when_it_cannot_be_glomeruli(tmp_path, capsys):
    """The count printed is that of the objects written; a prediction over most of the tissue is flagged."""
    slide = require_shared("wsi", "CMU-1-Small-Region.svs")
    out = tmp_path / "skin.zarr"
    assert main(["segment", str(slide), "--model", "default", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    n = objects_of(np.asarray(read_label_zarr(out).levels[0]))[1]
    assert printed.out.strip().splitlines()[-1].startswith(found_line(n))
    model = painting_model(tmp_path / "painting")
    out = tmp_path / "painted.zarr"
    assert main(["segment", str(slide), "--model", str(model), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    n = objects_of(np.asarray(read_label_zarr(out).levels[0]))[1]
    assert printed.out.strip().splitlines()[-1].startswith(found_line(n))
    warnings = [line for line in printed.err.splitlines() if line.startswith("nephro: warning: ")]
    assert len(warnings) == 1 and "pixel size" in warnings[0] and "tissue" in warnings[0], printed.err


def test_no_objects_keeps_the_pixel_map_of_a_model_with_rules(tmp_path, capsys):
    from napari_nephro.models.checkpoint import DEFAULT_FOLDER

    slide = require_shared("wsi", "CMU-1-Small-Region.svs")
    model = tmp_path / "with-rules"
    shutil.copytree(DEFAULT_FOLDER, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "objects": {"min_area_um2": 2000}}))
    region = ["--region", "600,1200,1000,1000", "--device", "cpu"]
    assert main(["segment", str(slide), "--model", str(model), "--out", str(tmp_path / "a.zarr"), *region]) == 0
    pyramid = read_label_zarr(tmp_path / "a.zarr")
    cleaned, mpp = np.asarray(pyramid.levels[0]), pyramid.mpp  # at the model's scale
    raw_args = ["segment", str(slide), "--model", str(model), "--out", str(tmp_path / "b.zarr"), "--no-objects"]
    assert main([*raw_args, *region]) == 0
    raw = np.asarray(read_label_zarr(tmp_path / "b.zarr").levels[0])
    lines = capsys.readouterr().out.splitlines()
    pieces, n = objects_of(cleaned)
    assert lines[1].startswith(found_line(n))
    areas = np.bincount(pieces.ravel())[1:] * mpp**2
    assert (areas >= 2000).all()
    raw_areas = np.bincount(objects_of(raw)[0].ravel())[1:] * mpp**2
    assert (raw_areas < 2000).any(), "without the rules the specks stay"
