"""`nephro batch` / `pipelines.batch`: a cohort of real slides on a LocalCluster of 2 workers.

Each test starts its own cluster (a few seconds: two processes importing torch), so
the cases are few and each checks much: equality with single-slide runs, rerun,
a broken slide, a worker killed mid-slide, and a folder of another model refused.
"""

from __future__ import annotations

import csv
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require_shared
from napari_nephro.annotations.io import read_label_file
from napari_nephro.cli import main
from napari_nephro.inference.api import segment_slide
from napari_nephro.inference.instance_api import read_nuclei_table, segment_instances_slide
from napari_nephro.io import open_slide
from napari_nephro.models.nuclei import load_nuclei_model
from napari_nephro.models.segmenter import TorchSegmenter
from napari_nephro.pipelines.batch import BatchError, batch, check_cohort_folder, model_items
from napari_nephro.report import biopsy_report

pytest.importorskip("distributed")

SLIDES = [("CMU-1-Small-Region.svs", ""), ("CMU-1-Small-Region-dicom", ""), ("tcga-cr-7395-01a-01-ts1.svs", "0.25")]


def cohort_csv(tmp_path: Path, broken: bool = False) -> Path:
    """The three real slides (the TCGA one states no pixel size: 0.25 given), and optionally a corrupt one."""
    rows = [(str(require_shared("wsi", name)), mpp) for name, mpp in SLIDES]
    if broken:
        bad = tmp_path / "broken.svs"
        bad.write_bytes(b"II*\x00" + os.urandom(4000))
        rows.append((str(bad), ""))
    path = tmp_path / "cohort.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "mpp"])
        writer.writerows(rows)
    return path


def single_run(path: str, mpp: str, out: Path, nuclei: bool = False) -> Path:
    """The same slide by the ordinary single-slide API, with the workers' one torch thread (same arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        slide = open_slide(path, mpp=float(mpp) if mpp else None)
        if nuclei:
            segmenter = load_nuclei_model("nuclei", device="cpu")
            segment_instances_slide(slide, segmenter, out, batch_size=segmenter.tiles_per_call or 4)
        else:
            segment_slide(slide, TorchSegmenter.from_checkpoint("default", device="cpu"), out, batch_size=4)
    finally:
        torch.set_num_threads(threads)
    return out


def labels(path: Path) -> np.ndarray:
    return np.asarray(read_label_file(path).labels)


def test_a_cohort_on_two_workers_equals_single_runs_and_a_rerun_skips_it(tmp_path, capsys):
    out = tmp_path / "cohort"
    events = []
    result = batch(
        cohort_csv(tmp_path, broken=True),
        ["default"],
        out,
        workers=2,
        device="cpu",
        progress=lambda done, total, event: events.append((done, total, event)),
    )
    names = ["CMU-1-Small-Region", "CMU-1-Small-Region-dicom", "tcga-cr-7395-01a-01-ts1", "broken"]
    assert [row["slide"] for row in result.rows] == names
    # the broken slide is one row with its error; the others completed
    assert [bool(row["error"]) for row in result.rows] == [False, False, False, True]
    assert result.rows[3]["error"].startswith("default: ") and "broken.svs" in result.rows[3]["error"]
    assert "\n" not in result.rows[3]["error"] and "Traceback" not in result.rows[3]["error"]
    assert {r["status"] for r in result.runs[:3]} == {"done"}
    assert events and events[-1][:2] == (4, 4) and any("total" in e for _, _, e in events)
    for (name, mpp), slide_name, row in zip(SLIDES, names, result.rows, strict=False):
        mine = out / slide_name / "default.zarr"
        alone = single_run(str(require_shared("wsi", name)), mpp, tmp_path / f"{slide_name}.zarr")
        assert np.array_equal(labels(mine), labels(alone)), slide_name
        expected = biopsy_report(
            open_slide(require_shared("wsi", name), mpp=float(mpp) if mpp else None), glomeruli=alone
        )
        assert {k: v for k, v in row.items() if k != "slide"} == {
            k: v for k, v in expected.row().items() if k != "slide"
        }
        assert (out / slide_name / "report.html").is_file()
    with open(result.csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["slide"] for r in table] == names and table[3]["error"]
    assert all(name in result.index.read_text() for name in names)

    # a rerun, from the shell: every finished slide is skipped, the broken one fails again, the exit says so
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/default.zarr/.zattrs")}
    assert main(["batch", str(tmp_path / "cohort.csv"), "--model", "default", "--out", str(out), "--workers", "2"]) == 1
    captured = capsys.readouterr()
    assert "3 skipped" in captured.out and "1 of 4 slides failed" in captured.err
    assert "dashboard" in captured.err
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/default.zarr/.zattrs")} == stamps


def test_a_worker_killed_mid_slide_is_retried_and_the_slide_ends_identical(tmp_path):
    out = tmp_path / "cohort"
    killed: list[int] = []
    lock = threading.Lock()

    def progress(done, total, event):
        """Kill (SIGKILL) the worker running the first slide halfway through its tiles: a lost machine."""
        with lock:
            if not killed and event.get("total") and event["total"] // 3 <= event["done"] < event["total"]:
                killed.append(event["pid"])
                os.kill(event["pid"], signal.SIGKILL)

    slides = [
        str(require_shared("wsi", "CMU-1-Small-Region.svs")),
        str(require_shared("wsi", "CMU-1-Small-Region-dicom")),
    ]
    result = batch(slides, ["nuclei"], out, workers=2, device="cpu", progress=progress)
    assert killed, "no tile event arrived to kill a worker on"
    assert not result.failed, result.failed
    assert "resumed" in {r["status"] for r in result.runs}  # the retry continued the dead worker's rows
    for path, run in zip(slides, result.runs, strict=True):
        alone = single_run(path, "", tmp_path / f"{Path(path).stem}-alone.zarr", nuclei=True)
        mine = Path(run["output"])
        assert np.array_equal(labels(mine), labels(alone))
        assert read_nuclei_table(mine) == read_nuclei_table(alone)
    assert all(row["nuclei"] > 100 for row in result.rows)


def test_a_cohort_folder_of_another_model_or_of_something_else_is_refused(tmp_path):
    slide = str(require_shared("wsi", "CMU-1-Small-Region.svs"))
    out = tmp_path / "cohort"
    check_cohort_folder(out, model_items(["default"]), "working")
    with pytest.raises(BatchError, match="other models"):
        batch([slide], ["nuclei"], out, workers=1)  # refused before any cluster starts
    with pytest.raises(BatchError, match="other models"):
        batch([slide], ["default"], out, workers=1, out_scale="full")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(BatchError, match="not a cohort folder"):
        batch([slide], ["default"], other, workers=1)
    assert sorted(p.name for p in other.iterdir()) == ["holiday.jpg"]
    assert main(["batch", str(tmp_path / "nothing-here"), "--model", "default", "--out", str(tmp_path / "x")]) == 2
