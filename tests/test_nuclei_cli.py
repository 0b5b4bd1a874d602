"""`nephro segment --model cellpose|stardist|cellvit`: nuclei into a table, detections or labels, and the refusals.

The runs here use the classical oracle segmenter through the family loader, so
they test the command's own work; the families' networks have their own tests.
"""

from __future__ import annotations

import json

import pytest

import napari_nephro.models.nuclei as nuclei_models
from conftest import require_shared
from napari_nephro.cli import main
from napari_nephro.inference.instance_api import read_nuclei_table
from nuclei_oracle import ClassicalNuclei


@pytest.fixture
def cmu():
    return str(require_shared("wsi", "CMU-1-Small-Region.svs"))


@pytest.fixture
def oracle(monkeypatch):
    calls = []

    def load(spec, *, device="auto", **options):
        calls.append((spec, options))
        return ClassicalNuclei()

    monkeypatch.setattr(nuclei_models, "load_nuclei_model", load)
    return calls


@pytest.mark.shared
def test_nuclei_of_a_region_into_a_table_and_the_count_printed(cmu, oracle, tmp_path, capsys):
    out = tmp_path / "nuclei.csv"
    args = [
        "segment",
        cmu,
        "--model",
        "cellpose:cyto3",
        "--diameter",
        "9",
        "--region",
        "0,0,1000,800",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert oracle == [
        (
            "cellpose:cyto3",
            {
                "diameter": 9.0,
                **dict.fromkeys(("flow_threshold", "cellprob_threshold", "prob_threshold", "nms_threshold")),
            },
        )
    ]
    rows = read_nuclei_table(out)
    printed = capsys.readouterr().out
    assert f"{len(rows):,} nuclei" in printed and "per mm² of tissue" in printed
    assert rows and {"id", "class", "score", "x_um", "y_um", "area_um2"} <= set(rows[0])


@pytest.mark.shared
def test_nuclei_into_qupath_detections_and_resume_of_a_complete_run(cmu, oracle, tmp_path, capsys):
    out = tmp_path / "nuclei.geojson"
    base = ["segment", cmu, "--model", "stardist", "--region", "0,0,900,900", "--out", str(out)]
    assert main(base) == 0
    features = json.loads(out.read_text())["features"]
    assert features and all(f["properties"]["objectType"] == "detection" for f in features)
    assert main([*base, "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out


@pytest.mark.shared
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "cellpose", "--threshold", "0.3"], "--threshold is for glomerulus models"),
        (["--model", "cellpose", "--no-objects"], "--no-objects is not an option of the nuclei models"),
        (["--model", "default", "--diameter", "8"], "--diameter: options of the nuclei models"),
        (["--model", "stardist", "--out-suffix", ".tif"], "must end in .zarr, .geojson, .csv or .parquet"),
    ],
)
def test_wrong_options_for_nuclei_are_one_line(cmu, oracle, tmp_path, capsys, extra, message):
    out = tmp_path / ("nuclei.tif" if "--out-suffix" in extra else "nuclei.csv")
    extra = [e for e in extra if e not in ("--out-suffix", ".tif")]
    assert main(["segment", cmu, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_an_option_of_another_family_is_refused_before_anything_loads():
    from napari_nephro.models import ModelError

    with pytest.raises(ModelError, match=r"--diameter: not an option of stardist \(stardist takes --prob-threshold"):
        nuclei_models.load_nuclei_model("stardist", diameter=8.0)
    with pytest.raises(ModelError, match="not a nuclei model"):
        nuclei_models.load_nuclei_model("default")
