"""The tiled engine: placement, seamless stitching, glass skipping, output files, cancel and resume."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_pyramid
from napari_nephro.annotations.omezarr import read_label_zarr
from napari_nephro.inference import SegmentError, make_plan, partial_path, segment_region, segment_slide
from napari_nephro.inference.stitch import RowStitcher, blend_window
from napari_nephro.io import open_slide

SLIDE_MPP = 0.5
DISCS = [(300, 400, 60), (700, 1000, 80), (1100, 300, 50), (250, 1250, 45)]  # (y, x, radius) in level-0 pixels


def disc_truth(shape=(1400, 1600)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    truth = np.zeros(shape, bool)
    for y, x, r in DISCS:
        truth |= (yy - y) ** 2 + (xx - x) ** 2 <= r**2
    return truth


@pytest.fixture(scope="module")
def disc_slide(tmp_path_factory) -> Path:
    """Pink tissue over the left three quarters, dark discs on it, glass on the right: a 3-level OME-TIFF."""
    shape = (1400, 1600)
    rgb = np.full((*shape, 3), 245, np.uint8)
    rgb[:, :1300] = (225, 160, 200)
    rgb[disc_truth(shape)] = (70, 30, 90)
    levels = [rgb]
    for _ in range(2):
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((w // 2, h // 2), Image.Resampling.BOX)))
    return write_pyramid(
        tmp_path_factory.mktemp("slides") / "discs.ome.tif", levels, "ome", mpp=SLIDE_MPP, tile=(128, 128)
    )


class Darkness:
    """A 'model' whose foreground probability is how dark a pixel is: the answer is known everywhere."""

    kind, fingerprint = "semantic", "darkness"

    def __init__(self, mpp=1.0, tile=128, overlap=32, fail_after=None, cancel_after=None, oom_above=None):
        self.mpp, self.tile_size, self.input_size, self.overlap = mpp, tile, tile, overlap
        self.classes = ["disc"]
        self.calls, self.tiles_seen = 0, []
        self.fail_after, self.cancel_after, self.oom_above = fail_after, cancel_after, oom_above
        self.cancelled = False

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        if self.oom_above is not None and len(tiles) > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.tiles_seen.extend(tiles)
        if self.cancel_after is not None and self.calls >= self.cancel_after:
            self.cancelled = True
        return ((255 - tiles.mean(axis=-1)) / 255 > 0.5).astype(np.float32)[:, None]


class PerTileConstant:
    """Each tile gets its own random constant: the worst case for seams."""

    kind, classes, fingerprint = "semantic", ["x"], "const"

    def __init__(self, tile=64, overlap=16, value=None, channels=1):
        self.mpp, self.tile_size, self.input_size, self.overlap = 1.0, tile, tile, overlap
        self.rng, self.value = np.random.default_rng(1), value
        self.classes = ["x"] if channels == 1 else [f"c{i}" for i in range(channels - 1)]

    def predict(self, tiles):
        n, c = len(tiles), 1 if len(self.classes) == 1 else len(self.classes) + 1
        values = self.rng.random((n, c)) if self.value is None else np.full((n, c), self.value)
        return np.broadcast_to(values[:, :, None, None], (n, c, *tiles.shape[1:3])).astype(np.float32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.sum(a & b) / (a.sum() + b.sum())


def test_blend_window_overlapping_tiles_sum_to_one():
    window = blend_window(64, 16)[32]  # the middle row: the 1-D ramp
    stride = 64 - 16
    overlap_sum = window[stride:] + window[:16]
    np.testing.assert_allclose(overlap_sum / overlap_sum.max(), 1, atol=1e-6)
    assert window[32] == 1 and window[0] < 0.01


def test_masks_land_where_the_objects_are(disc_slide):
    """Model at 1 um/px on a 0.5 um/px slide, output at level 0: tile placement and resampling are exact."""
    slide = open_slide(disc_slide)
    result = segment_region(slide, Darkness())
    assert result.array.shape == slide.level_shapes[0]
    assert result.mpp == SLIDE_MPP and result.classes == {1: "disc"}
    assert dice(result.array == 1, disc_truth()) > 0.97


def test_a_region_matches_the_same_part_of_a_whole_slide_run(disc_slide):
    slide = open_slide(disc_slide)
    whole = segment_region(slide, Darkness()).array
    region = segment_region(slide, Darkness(), (600, 500, 700, 500))
    assert region.region == (600, 500, 700, 500) and region.array.shape == (500, 700)
    assert np.mean(region.array == whole[500:1000, 600:1300]) > 0.995
    coarse = segment_region(slide, Darkness(), out_downsample=4)
    assert coarse.array.shape == (350, 400) and coarse.mpp == 4 * SLIDE_MPP
    assert dice(coarse.array == 1, disc_truth()[2::4, 2::4]) > 0.95


def test_a_constant_model_gives_a_constant_map(disc_slide):
    slide = open_slide(disc_slide)
    out = segment_region(slide, PerTileConstant(value=0.7), probabilities=True, skip_background=False).array
    np.testing.assert_allclose(out, 0.7, atol=1e-5)


def test_tiles_that_differ_by_a_constant_leave_no_seam(disc_slide):
    slide = open_slide(disc_slide)
    model = PerTileConstant(tile=96, overlap=32)
    out = segment_region(slide, model, probabilities=True, skip_background=False, out_downsample=2).array[0]
    spread = out.max() - out.min()
    assert spread > 0.5  # the tiles really disagree
    step = max(np.abs(np.diff(out, axis=0)).max(), np.abs(np.diff(out, axis=1)).max())
    # a hard tile border would jump by up to the whole spread; a sin^2 ramp over 32 px by at most pi/64 of it
    assert step <= spread * np.pi / 64 * 1.1
    # the same tiles without blending would show steps as large as their differences
    stitcher = RowStitcher((200, 200), 1, 64, 0)
    stitcher.add(0, 0, np.zeros((1, 64, 64), np.float32))
    stitcher.add(0, 64, np.ones((1, 64, 64), np.float32))
    _, rows = stitcher.release(64)
    assert np.abs(np.diff(rows[0], axis=1)).max() == 1


def test_several_classes_are_argmaxed_and_uncovered_glass_is_background(disc_slide):
    slide = open_slide(disc_slide)
    model = PerTileConstant(channels=3)
    out = segment_region(slide, model, out_downsample=4)
    assert set(np.unique(out.array)) <= {0, 1, 2} and out.classes == {1: "c0", 2: "c1"}
    assert np.all(out.array[:, -40:] == 0)  # the glass band on the right was never predicted


def test_glass_tiles_never_reach_the_model(disc_slide):
    slide = open_slide(disc_slide)
    plan = make_plan(slide, model_mpp=1.0, tile=128, overlap=32)
    assert 0 < plan.skipped < len(plan.tiles)
    model = Darkness()
    result = segment_region(slide, model)
    assert result.stats.skipped == plan.skipped
    assert result.stats.predicted == len(plan.tiles) - plan.skipped == len(model.tiles_seen)
    saturation = [np.ptp(t.astype(int), axis=-1).max() for t in model.tiles_seen]
    assert min(saturation) > 20  # every tile the model saw held tissue
    everything = segment_region(slide, Darkness(), skip_background=False)
    assert np.array_equal(everything.array, result.array)


def test_rows_of_tiles_that_are_all_glass_are_background(tmp_path):
    """The last row of tiles is moved back over the one before; when both are glass nothing reaches them."""
    rgb = np.full((1024, 1024, 3), 245, np.uint8)
    rgb[:200, :] = (70, 30, 90)  # tissue, dark enough to be foreground, in the top rows only
    Image.fromarray(rgb).save(tmp_path / "top.png")
    slide = open_slide(tmp_path / "top.png", mpp=0.5)
    model = Darkness(mpp=0.5, tile=512, overlap=128)  # rows of tiles at 0, 384 and 512 (moved back)
    result = segment_region(slide, model)
    assert result.stats.skipped > 0 and result.stats.complete
    assert result.array[:190].all() and not result.array[220:].any()


def test_progress_reports_every_tile_and_an_eta(disc_slide):
    seen = []
    segment_region(open_slide(disc_slide), Darkness(), progress=seen.append)
    assert seen[-1].done == seen[-1].total and [p.done for p in seen] == sorted(p.done for p in seen)
    assert seen[-1].tiles_per_second > 0 and seen[-1].eta_seconds == 0


def test_whole_slide_to_ome_zarr_tiff_and_geojson(disc_slide, tmp_path):
    from napari_nephro.annotations import read_annotations
    from napari_nephro.annotations.labeltiff import read_label_tiff_pyramid

    slide = open_slide(disc_slide)
    result = segment_slide(slide, Darkness(), tmp_path / "discs.zarr", out_downsample="full")
    assert result.path == tmp_path / "discs.zarr" and not result.partial.exists()
    pyramid = read_label_zarr(result.path)
    assert pyramid.levels[0].shape == slide.level_shapes[0] and pyramid.mpp == SLIDE_MPP
    assert pyramid.classes == {1: "disc"} and len(pyramid.levels) >= 2
    assert dice(np.asarray(pyramid.levels[0]) == 1, disc_truth()) > 0.97
    record = json.loads((result.path / ".zattrs").read_text())["napari-nephro-run"]
    assert record["complete"] and record["model"] == "darkness"

    tif = segment_slide(slide, Darkness(), tmp_path / "discs.tif", out_downsample="full").path
    tif_pyramid = read_label_tiff_pyramid(tif)
    assert np.array_equal(np.asarray(tif_pyramid.levels[0]), np.asarray(pyramid.levels[0]))
    assert tif_pyramid.run["model"] == "darkness" and tif_pyramid.unfinished() is None  # a finished TIFF's record
    assert tif_pyramid.slide_shape == slide.level_shapes[0] and tif_pyramid.slide_downsample == 1.0

    objects = read_annotations(segment_slide(slide, Darkness(), tmp_path / "discs.geojson").path)  # working scale
    assert len(objects) == len(DISCS) and set(objects.counts()) == {"disc"}
    for annotation, (y, x, r) in zip(
        sorted(objects, key=lambda a: a.geometry.centroid.x), sorted(DISCS, key=lambda d: d[1]), strict=True
    ):
        assert abs(annotation.geometry.centroid.x - x) < 2 and abs(annotation.geometry.centroid.y - y) < 2
        assert annotation.area == pytest.approx(np.pi * r * r, rel=0.05)


def test_a_run_says_where_its_time_went(disc_slide, tmp_path):
    stats = segment_slide(open_slide(disc_slide), Darkness(), tmp_path / "discs.zarr").stats
    assert stats.complete and stats.predicted > 0
    assert stats.read_seconds > 0 and stats.model_seconds > 0 and stats.stitch_seconds > 0 and stats.write_seconds > 0
    assert stats.model_seconds + stats.wait_seconds <= stats.seconds  # both on the model's thread, one after the other
    shares = stats.shares()
    assert set(shares) == {"read", "wait", "model", "stitch", "write", "tail"} and min(shares.values()) >= 0
    for one_thread in ("model", "stitch", "write", "tail"):  # reading is summed over the reader threads
        assert shares[one_thread] <= 1, one_thread


def test_a_region_file_keeps_the_slide_extent(disc_slide, tmp_path):
    slide = open_slide(disc_slide)
    out = segment_slide(slide, Darkness(), tmp_path / "part.zarr", region=(200, 150, 400, 400), out_downsample="full")
    out = out.path
    labels = np.asarray(read_label_zarr(out).levels[0])
    assert labels.shape == slide.level_shapes[0]
    truth = disc_truth()
    assert dice(labels[150:550, 200:600] == 1, truth[150:550, 200:600]) > 0.97
    assert not labels[600:].any() and not labels[:, 600:].any()  # nothing computed outside the region


def levels_of(path) -> list[np.ndarray]:
    return [np.asarray(level) for level in read_label_zarr(path).levels]


def test_cancel_keeps_finished_rows_and_resume_completes_identically(disc_slide, tmp_path):
    slide = open_slide(disc_slide)
    reference_levels = levels_of(segment_slide(slide, Darkness(), tmp_path / "ref.zarr").path)
    reference = reference_levels[0]

    out = tmp_path / "run.zarr"
    first = Darkness(cancel_after=12)
    result = segment_slide(slide, first, out, batch_size=2, cancel=lambda: first.cancelled)
    assert result.path is None and not out.exists() and not result.stats.complete
    assert 0 < result.rows_done < result.rows
    partial = read_label_zarr(partial_path(out))  # a valid label image at every moment
    done = np.asarray(partial.levels[0])[: result.rows_done]
    assert np.array_equal(done, reference[: result.rows_done])

    with pytest.raises(SegmentError, match="--resume"):
        segment_slide(slide, Darkness(), out)
    with pytest.raises(SegmentError, match="different threshold"):
        segment_slide(slide, Darkness(), out, resume=True, threshold=0.3)
    second = Darkness()
    finished = segment_slide(slide, second, out, resume=True, batch_size=2)
    assert finished.path == out and not partial_path(out).exists()
    assert second.calls * 2 < result.stats.tiles - result.stats.skipped + 2  # only the rest was predicted
    for level, expected in zip(levels_of(out), reference_levels, strict=True):
        assert np.array_equal(level, expected)


def test_a_killed_run_rebuilds_the_coarse_levels_it_had_not_written(disc_slide, tmp_path, monkeypatch):
    """A kill loses what the coarse levels held in memory; resume rebuilds it from level 0 on disk."""
    from napari_nephro.inference import output

    slide = open_slide(disc_slide)
    region = (100, 60, 1500, 1300)  # offsets that no level's factor divides
    reference = levels_of(segment_slide(slide, Darkness(), tmp_path / "ref.zarr", region=region).path)
    out = tmp_path / "run.zarr"
    real_flush = output._LevelWriter.flush
    monkeypatch.setattr(output._LevelWriter, "flush", lambda self: real_flush(self) if self.factor == 1 else None)
    with pytest.raises(KeyboardInterrupt):
        segment_slide(slide, Darkness(fail_after=30), out, batch_size=1, region=region)
    monkeypatch.setattr(output._LevelWriter, "flush", real_flush)
    record = json.loads((partial_path(out) / ".zattrs").read_text())["napari-nephro-run"]
    assert record["rows_done"] > 0 and record["levels_done"][1] * 2 < record["rows_done"]  # level 1 lags
    segment_slide(slide, Darkness(), out, resume=True, region=region, batch_size=1)
    for level, expected in zip(levels_of(out), reference, strict=True):
        assert np.array_equal(level, expected)


def test_an_interrupted_run_is_kept_and_resumed(disc_slide, tmp_path):
    """Ctrl-C (or a crash) inside the model: the finished rows are on disk and resume finishes the rest."""
    slide = open_slide(disc_slide)
    out = tmp_path / "run.tif"
    with pytest.raises(KeyboardInterrupt):
        segment_slide(slide, Darkness(fail_after=20), out, batch_size=1)
    assert not out.exists()
    rows_done = json.loads((partial_path(out) / ".zattrs").read_text())["napari-nephro-run"]["rows_done"]
    assert rows_done > 0
    segment_slide(slide, Darkness(), out, resume=True, batch_size=1)
    assert out.exists() and not partial_path(out).exists()


def test_out_of_gpu_memory_retries_with_smaller_batches(disc_slide):
    slide = open_slide(disc_slide)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = segment_region(slide, Darkness(oom_above=1), batch_size=4)
    assert any("out of GPU memory" in str(w.message) for w in caught)
    assert np.array_equal(result.array, segment_region(slide, Darkness()).array)


def test_bad_requests_are_one_line_errors(disc_slide, tmp_path):
    slide = open_slide(disc_slide)
    with pytest.raises(SegmentError, match="outside the 1600 x 1400 slide"):
        segment_region(slide, Darkness(), (5000, 0, 100, 100))
    with pytest.raises(SegmentError, match="empty"):
        segment_region(slide, Darkness(), (0, 0, 0, 100))
    with pytest.raises(SegmentError, match="threshold"):
        segment_region(slide, Darkness(), threshold=1.5)
    with pytest.raises(SegmentError, match=r"\.zarr"):
        segment_slide(slide, Darkness(), tmp_path / "out.png")
    (tmp_path / "taken.zarr").mkdir()
    with pytest.raises(SegmentError, match="already exists"):
        segment_slide(slide, Darkness(), tmp_path / "taken.zarr")
    with pytest.raises(SegmentError, match="nothing to resume"):
        segment_slide(slide, Darkness(), tmp_path / "new.zarr", resume=True)
    png = tmp_path / "plain.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    with pytest.raises(SegmentError, match=r"pixel size is unknown.*--mpp"):
        segment_region(open_slide(png), Darkness())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.png", "taken.zarr"]  # nothing left behind


def test_a_failing_writer_stops_the_run_with_its_own_error(disc_slide):
    """A disk that fills up mid-run: the model stops being fed and the real error comes out, no hang."""
    from napari_nephro.inference.engine import run_tiles

    class FullDisk:
        rows_done, flushed = 0, False

        def prepare(self, probs):
            return probs

        def write(self, y, rows):
            raise OSError(28, "No space left on device")

        def flush(self):
            self.flushed = True

    slide = open_slide(disc_slide)
    plan = make_plan(slide, model_mpp=1.0, tile=128, overlap=32)
    model, sink = Darkness(), FullDisk()
    with pytest.raises(OSError, match="No space left"):
        run_tiles(slide, model, plan, sink, batch_size=2)
    assert sink.flushed and len(model.tiles_seen) < len(plan.tiles) - plan.skipped
