"""Runs that must not lose or mix results: two writers, resumes, refusals that leave nothing, options parsed whole."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import require_shared
from napari_nephro.annotations.omezarr import read_label_zarr
from napari_nephro.cli import main
from napari_nephro.common.atomic import atomic_output
from napari_nephro.inference import partial_path, segment_slide
from napari_nephro.inference.errors import SegmentError
from napari_nephro.inference.plan import cells
from napari_nephro.io import open_slide


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "unet"
    assert main(["model", "init", "--arch", "unet", "--encoder", "resnet18", "--out", str(out)]) == 0
    return out


@pytest.fixture
def cmu():
    return require_shared("wsi", "CMU-1-Small-Region.svs")


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _hold_lock(out):
    """Another process holding `out`'s lock, as a second nephro run would."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from napari_nephro.common.lock import exclusive\n"
        "with exclusive(Path(sys.argv[1])):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def _complete_zarr(path) -> bool:
    labels = read_label_zarr(path)
    return all(np.asarray(level).size for level in labels.levels)


def test_a_second_run_on_a_busy_output_refuses_and_loses_nothing(checkpoint, cmu, tmp_path, capsys):
    out = tmp_path / "cmu.zarr"
    args = ["segment", str(cmu), "--model", str(checkpoint), "--out", str(out), "--region", "0,0,800,800"]
    assert main(args) == 0
    capsys.readouterr()  # what it said it found (a random model on skin: with a warning)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    child = _hold_lock(out)
    try:
        assert main([*args, "--overwrite"]) == 2
        err = _one_line(capsys.readouterr().err)
        assert f"pid {child.pid}" in err and "writing it" in err
        # the library call the widget makes is refused the same way, after planning
        with pytest.raises(SegmentError, match="another nephro run"):
            from napari_nephro.models import TorchSegmenter

            segment_slide(open_slide(cmu), TorchSegmenter.from_checkpoint(checkpoint), out, overwrite=True)
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and _complete_zarr(out)
        assert not partial_path(out).exists()
    finally:
        child.kill()
        child.wait()
    # a killed holder leaves no stale lock: the next run goes ahead
    assert main([*args, "--overwrite"]) == 0
    assert _complete_zarr(out) and not any(p.name.endswith(".lock") for p in tmp_path.iterdir())


def test_two_overwriting_runs_at_once_leave_one_complete_output(checkpoint, cmu, tmp_path):
    out = tmp_path / "cmu.zarr"
    args = [sys.executable, "-m", "napari_nephro.cli", "segment", str(cmu), "--model", str(checkpoint)]
    args += ["--out", str(out), "--region", "0,0,1500,1500", "--overwrite", "--device", "cpu"]
    assert subprocess.run(args, capture_output=True).returncode == 0
    runs = [subprocess.Popen(args, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(), run.stderr.read()) for run in runs]
    for code, err in results:
        assert code == 0 or (code == 2 and "another nephro run" in err and err.count("\n") == 1), err
    assert _complete_zarr(out) and not partial_path(out).exists()
    record = json.loads((out / ".zattrs").read_text())["napari-nephro-run"]
    assert record["complete"] and record["rows_done"] == record["rows"]


def test_resume_of_a_finished_run_says_so_and_keeps_it(checkpoint, cmu, tmp_path, capsys):
    out = tmp_path / "cmu.geojson"
    args = ["segment", str(cmu), "--model", str(checkpoint), "--out", str(out), "--region", "0,0,600,600"]
    assert main(args) == 0
    capsys.readouterr()
    stamp = out.stat().st_mtime_ns
    assert main([*args, "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == stamp


def test_a_resume_with_another_batch_would_mix_two_runs_and_is_refused(checkpoint, cmu, tmp_path, capsys):
    from napari_nephro.models import TorchSegmenter

    out = tmp_path / "cmu.zarr"
    calls = []
    with pytest.raises(KeyboardInterrupt):

        def interrupt_after_two_rows(progress):
            calls.append(progress.done)
            if len(calls) == 12:  # 11 batches of 2: two of the six rows of tiles are done
                raise KeyboardInterrupt

        segment_slide(
            open_slide(cmu),
            TorchSegmenter.from_checkpoint(checkpoint),
            out,
            tile=256,
            overlap=64,
            batch_size=2,
            skip_background=False,
            progress=interrupt_after_two_rows,
        )
    assert partial_path(out).exists()
    args = ["segment", str(cmu), "--model", str(checkpoint), "--out", str(out), "--tile", "256", "--overlap", "64"]
    assert main([*args, "--all-tiles", "--resume", "--batch", "3"]) == 2
    assert "batch (was 2, now 3)" in _one_line(capsys.readouterr().err)
    assert main([*args, "--all-tiles", "--resume", "--batch", "2"]) == 0
    assert _complete_zarr(out)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--tile", "100000"], "at most 8192"),
        (["--batch", "100000"], "GiB in memory"),
    ],
)
def test_absurd_sizes_are_refused_before_anything_is_written(checkpoint, cmu, tmp_path, capsys, extra, reason):
    out = tmp_path / "cmu.zarr"
    assert main(["segment", str(cmu), "--model", str(checkpoint), "--out", str(out), *extra]) == 2
    assert reason in _one_line(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == []


def test_a_run_that_fails_before_its_first_row_leaves_no_partial_store(cmu, tmp_path):
    class Broken:
        kind, classes, fingerprint, mpp, tile_size, overlap = "semantic", ["x"], "broken", 1.0, 256, 32

        def predict(self, tiles):
            raise ValueError("the model broke")

    with pytest.raises(ValueError, match="the model broke"):
        segment_slide(open_slide(cmu), Broken(), tmp_path / "x.zarr")
    assert os.listdir(tmp_path) == []


def test_a_region_left_of_or_above_the_slide_is_accepted(checkpoint, cmu, tmp_path):
    out = tmp_path / "corner.zarr"
    assert (
        main(["segment", str(cmu), "--model", str(checkpoint), "--out", str(out), "--region", "-100,-100,400,400"]) == 0
    )
    labels = read_label_zarr(out)  # the whole slide's extent, at the model's scale
    assert labels.slide_shape == open_slide(cmu).level_shapes[0]
    assert labels.levels[0].shape == tuple(cells(n, labels.slide_downsample) for n in labels.slide_shape)


@pytest.mark.parametrize(
    "argv",
    [
        ["segment", "S", "--model", "m", "--out", "o.zarr", "--region", "nan,0,10,10"],
        ["segment", "S", "--model", "m", "--out", "o.zarr", "--region", "0,0,inf,10"],
        ["segment", "S", "--model", "m", "--out", "o.zarr", "--threshold", "nan"],
        ["segment", "S", "--model", "m", "--out", "o.zarr", "--mpp", "inf"],
        ["evaluate", "--pred", "a", "--truth", "b", "--iou", "nan"],
        ["train", "--annotations", "a", "--images", "b", "--out", "c", "--lr", "nan"],
        ["train", "--annotations", "a", "--images", "b", "--out", "c", "--val-fraction", "2"],
        ["export", "a", "--to", "tiles", "--out", "o", "--mpp", "-1"],
        ["segment"],
        ["no-such-command"],
    ],
)
def test_option_errors_are_one_line_with_a_pointer_to_help(argv, capsys):
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("nephro") and "error:" in err and "--help" in err


def test_a_number_that_is_not_finite_in_a_pair_option_is_one_line(capsys):
    argv = ["train", "--annotations", "a", "--images", "b", "--out", "c", "--oversample", "global=inf"]
    assert main(argv) == 2
    assert "not a finite number" in _one_line(capsys.readouterr().err)


def test_temporary_files_of_killed_writers_are_cleaned_and_a_moved_aside_folder_restored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended
    stale = tmp_path / f".tiles.{pid}.tmp"
    (stale / "images").mkdir(parents=True)
    (stale / "images" / "0.png").write_bytes(b"half")
    live = tmp_path / f".tiles.{os.getppid()}.tmp"  # a live process's files stay
    live.mkdir()
    with atomic_output(tmp_path / "tiles") as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert not stale.exists() and live.exists() and (tmp_path / "tiles" / "new.txt").exists()
    # killed between moving the old folder aside and the new one in: the old one comes back
    old = tmp_path / f".results.{pid}.old"
    old.mkdir()
    (old / "mine.txt").write_text("mine")
    with atomic_output(tmp_path / "other") as tmp:
        tmp.write_text("x")
    assert not (tmp_path / "results").exists()  # only the path being written is looked after
    with atomic_output(tmp_path / "results") as tmp:
        assert (tmp_path / "results" / "mine.txt").read_text() == "mine"  # restored before the write
        tmp.mkdir()
    assert not old.exists()


BUPT = ("glomeruli", "bupt_multistain_dev")


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--to", "tiles", "--tile", "100000"], "between 16 and 8192 px, not 100000"),
        (["--to", "tiles", "--mpp", "1e-9"], "between 0.05 and 50 um/px, not 1e-09"),
    ],
)
def test_export_refuses_absurd_tiles_and_scales_before_cutting(tmp_path, capsys, argv, reason):
    data = require_shared(*BUPT)
    out = tmp_path / "tiles"
    args = ["export", str(data / "annotations.json"), "--slide", str(data / "images"), "--out", str(out)]
    assert main([*args, *argv]) == 2
    assert reason in _one_line(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("argv", "reason"),
    [(["--size", "100000"], "between 16 and 8192 px"), (["--mpp", "1e-9"], "between 0.05 and 50 um/px")],
)
def test_prompt_sets_refuse_absurd_crops_and_scales(tmp_path, capsys, argv, reason):
    data = require_shared(*BUPT)
    folder = tmp_path / "prompts"
    args = ["prompts", "add", str(folder), str(data / "annotations.json"), "--images", str(data / "images")]
    assert main([*args, "--image-mpp", "0.5", "--map", "gn=normal", "gs=normal", "gl=ignore", "gm=ignore", *argv]) == 2
    assert reason in _one_line(capsys.readouterr().err)
    assert not folder.exists()


def test_a_prompt_set_file_with_a_nan_scale_is_refused(tmp_path):
    from napari_nephro.prompts import PromptError, PromptSet

    folder = tmp_path / "set"
    PromptSet(["normal"]).save(folder)
    index = json.loads((folder / "prompts.json").read_text())
    (folder / "prompts.json").write_text(json.dumps({**index, "mpp": float("nan")}))
    with pytest.raises(PromptError, match="finite number"):
        PromptSet.load(folder)


def test_the_library_refuses_non_finite_regions_and_absurd_model_scales(cmu):
    from napari_nephro.inference import make_plan

    slide = open_slide(cmu)
    for region in [(float("nan"), 0, 10, 10), (0, 0, float("inf"), 10)]:
        with pytest.raises(SegmentError, match="finite"):
            make_plan(slide, model_mpp=1.0, tile=256, overlap=0, region=region)
    with pytest.raises(SegmentError, match=r"between 0\.05 and 50 um/px"):
        make_plan(slide, model_mpp=1e-9, tile=256, overlap=0)
    with pytest.raises(SegmentError, match="tiles of 16 px"):  # billions of tiles: refused before they are listed
        make_plan(slide, model_mpp=0.05, tile=16, overlap=15, skip_background=False)


def test_resume_after_a_kill_while_the_finished_store_was_being_removed(checkpoint, cmu, tmp_path, capsys, monkeypatch):
    import napari_nephro.inference.output as output

    out = tmp_path / "cmu.geojson"
    args = ["segment", str(cmu), "--model", str(checkpoint), "--out", str(out), "--region", "0,0,600,600"]

    class KilledWhileRemoving:  # output.py's shutil, whose rmtree of the finished store is interrupted
        def __getattr__(self, name):
            return getattr(shutil, name)

        def rmtree(self, path, *args, **kwargs):
            monkeypatch.setattr(output, "shutil", shutil)
            raise KeyboardInterrupt

    monkeypatch.setattr(output, "shutil", KilledWhileRemoving())
    assert main(args) == 130
    assert out.exists() and partial_path(out).exists()  # the output is written, its store not yet removed
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert out.exists() and not partial_path(out).exists()


def test_a_filesystem_without_locks_still_runs_with_a_warning(cmu, tmp_path, monkeypatch):
    import errno

    import napari_nephro.common.lock as lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    out = tmp_path / "x.zarr"
    with pytest.warns(RuntimeWarning, match="cannot lock it"), lock.exclusive(out):
        pass
    assert lock.holder(out) is None


def test_temporary_files_of_other_hosts_and_odd_names_are_left_alone(tmp_path):
    other = tmp_path / ".tiles.otherhost-1.tmp"  # pid 1 of another machine sharing the folder
    other.mkdir()
    odd = tmp_path / ".tiles.99999999999999999999999.tmp"  # no process has such a pid
    odd.mkdir()
    with atomic_output(tmp_path / "tiles") as tmp:
        tmp.mkdir()
    assert other.exists() and odd.exists() and (tmp_path / "tiles").is_dir()


def test_threshold_bounds_are_the_librarys_and_abbreviated_region_takes_negatives(capsys):
    assert main(["segment", "S", "--model", "m", "--out", "o.zarr", "--threshold", "1"]) == 2
    assert "must be in (0, 1), not 1" in _one_line(capsys.readouterr().err)
    assert main(["segment", "S", "--model", "m", "--out", "o.zarr", "--reg", "-5,-5,10,10"]) == 2
    assert "no such file" in _one_line(capsys.readouterr().err)  # parsed: the slide S is what is missing


def test_a_symbolic_link_loop_is_named_as_one_by_every_reader(tmp_path, capsys):
    loop = tmp_path / "loop.geojson"
    loop.symlink_to(loop)
    for argv in (
        ["evaluate", "--pred", str(loop), "--truth", str(loop), "--shape", "10,10"],
        ["export", str(loop), "--to", "coco", "--out", str(tmp_path / "out.json")],
        ["info", str(loop)],
    ):
        assert main(argv) == 2
        assert "symbolic link loop" in _one_line(capsys.readouterr().err), argv


def test_features_without_geometry_are_skipped_with_a_note_on_stderr(tmp_path, capsys):
    square = {"type": "Polygon", "coordinates": [[[10, 10], [40, 10], [40, 40], [10, 40], [10, 10]]]}
    features = [
        {"type": "Feature", "geometry": None, "properties": {}},
        {"type": "Feature", "geometry": square, "properties": {"objectType": "annotation"}},
    ]
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    assert main(["evaluate", "--pred", str(path), "--truth", str(path), "--shape", "64,64", "--json"]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("nephro: note:")]
    assert notes and all("without geometry" in n for n in notes) and "Traceback" not in captured.err
    report = json.loads(captured.out)
    assert report["images"][0]["n_true"] == 1 and report["images"][0]["f1"] == 1


def test_a_prompt_index_nested_too_deep_is_one_line(tmp_path, capsys):
    from napari_nephro.prompts import PromptSet

    folder = tmp_path / "set"
    PromptSet(["normal"]).save(folder)
    (folder / "prompts.json").write_text("[" * 200_000 + "]" * 200_000)
    assert main(["prompts", "list", str(folder)]) == 2
    assert "prompts.json" in _one_line(capsys.readouterr().err)


def test_output_piped_into_a_reader_that_stops_early_is_not_an_error(cmu):
    run = subprocess.Popen(
        [sys.executable, "-m", "napari_nephro.cli", "info", str(cmu), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run.stdout.close()  # like `| head`, gone before anything is written
    assert run.wait() == 141
    assert run.stderr.read() == ""


def test_mistakes_that_do_not_depend_on_the_model_are_refused_before_it_loads(cmu, tmp_path, capsys, monkeypatch):
    from napari_nephro.models import TorchSegmenter

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(TorchSegmenter, "from_checkpoint", classmethod(never))
    png = tmp_path / "plain.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    for argv, reason in (
        (["segment", str(png), "--model", "default", "--out", str(tmp_path / "a.zarr")], "pixel size is unknown"),
        (
            [
                "segment",
                str(cmu),
                "--model",
                "default",
                "--region",
                "9000,9000,10,10",
                "--out",
                str(tmp_path / "b.zarr"),
            ],
            "outside",
        ),
    ):
        assert main(argv) == 2
        assert reason in _one_line(capsys.readouterr().err)


def test_a_mistyped_model_name_is_pointed_to_the_shipped_one(cmu, tmp_path, capsys):
    assert main(["segment", str(cmu), "--model", "defualt", "--out", str(tmp_path / "a.zarr")]) == 2
    assert "did you mean 'default'?" in _one_line(capsys.readouterr().err)


def test_export_cuts_images_without_a_pixel_size_at_the_one_given(tmp_path, capsys):
    data = require_shared(*BUPT)
    args = ["export", str(data / "annotations.json"), "--slide", str(data / "images"), "--to", "tiles"]
    args += ["--mpp", "2", "--tile", "256", "--overlap", "0", "--keep", "objects"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "pixel size is unknown" in _one_line(capsys.readouterr().err)
    assert main([*args, "--out", str(tmp_path / "b"), "--image-mpp", "0.5"]) == 0
    index = json.loads((tmp_path / "b" / "dataset.json").read_text())
    assert index["mpp"] == 2 and {s["mpp"] for s in index["sources"]} == {0.5}
    from PIL import Image

    first = sorted((tmp_path / "b" / "images").iterdir())[0]
    assert Image.open(first).size == (256, 256)  # 1360 x 1024 images at 0.5 um/px cut at 2 um/px: a quarter


def test_a_prediction_without_classes_is_not_scored_on_classes_the_image_lacks(tmp_path, capsys):
    import tifffile

    square = [10, 10, 40, 10, 40, 40, 10, 40]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
        "categories": [{"id": 1, "name": "normal"}, {"id": 2, "name": "global sclerosis"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [square], "iscrowd": 0}],
    }
    (tmp_path / "truth.json").write_text(json.dumps(coco))
    pred = np.zeros((64, 64), np.uint8)
    pred[10:40, 10:40] = 1
    pred[50:60, 50:60] = 1  # a false positive
    tifffile.imwrite(tmp_path / "a.tif", pred)
    assert main(["evaluate", "--pred", str(tmp_path / "a.tif"), "--truth", str(tmp_path / "truth.json"), "--json"]) == 0
    per_class = json.loads(capsys.readouterr().out)["images"][0]["per_class"]
    assert 0.8 < per_class["normal"]["dice"] < 1
    assert per_class["global sclerosis"]["dice"] is None  # absent: '-', not 0.000


def test_training_at_an_absurd_scale_is_one_line(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((2000, 2000, 3), 150, np.uint8)).save(tmp_path / "images" / "a.png")
    mask = np.zeros((2000, 2000), np.uint8)
    mask[100:300, 100:300] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    argv = ["train", "--annotations", str(tmp_path / "masks"), "--images", str(tmp_path / "images")]
    argv += ["--image-mpp", "50", "--mpp", "0.05", "--tile", "16", "--overlap", "15", "--out", str(tmp_path / "ck")]
    assert main(argv) == 2
    assert "tiles of 16 px" in _one_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "masks"]
