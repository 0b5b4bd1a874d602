"""`nephro review ...`: one lab's round from the shell, on the real CMU-1 slide with the shipped nuclei model.

Ratings are written as the Review widget writes them (`layout.append_rating`); every
other step is the command a user types.
"""

from __future__ import annotations

import csv
import json

import pytest

from conftest import require_shared
from napari_nephro.cli import main
from napari_nephro.review import layout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    slide = require_shared("wsi", "CMU-1-Small-Region.svs")
    root = tmp_path_factory.mktemp("cli-review") / "project"
    argv = ["review", "new", str(root), "--slides", str(slide), "--models", "nuclei", "again=nuclei"]
    assert main([*argv, "--patches", "3", "--size", "128", "--mpp", "0.5", "--seed", "1", "--device", "cpu"]) == 0
    return root


def status(root, capsys) -> dict:
    capsys.readouterr()
    assert main(["review", "status", str(root), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_round_from_new_to_a_fine_tuned_model_rated_next(project, tmp_path, capsys):
    first = status(project, capsys)
    patches = [p.patch for p in layout.read_patches(project)]
    assert len(patches) == 3
    assert json.dumps(first).count("nuclei") >= 1
    # one patch good for both, one bad for both (hard), one medium / good
    for patch, (a, b) in zip(patches, [("good", "good"), ("bad", "bad"), ("medium", "good")], strict=True):
        layout.append_rating(project, "ana", patch, "nuclei", a)
        layout.append_rating(project, "ana", patch, "again", b)

    assert main(["review", "fuse", str(project)]) == 0
    printed = capsys.readouterr().out
    pngs = sorted(layout.results_dir(project).glob("*.png"))
    assert pngs and all(str(p) in printed for p in pngs)

    # the hard patch corrected: the widget's save, here with the prediction itself
    from napari_nephro.review.sets import save_correction

    hard = patches[1]
    save_correction(project, hard, layout.read_labels(layout.prediction_tif(project, "nuclei", hard)), rater="ana")

    dataset = tmp_path / "tiles"
    assert main(["review", "export", str(project), "--to", "tiles", "--out", str(dataset)]) == 0
    with open(dataset / "tiles.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["set"] for r in rows) == ["easy", "easy", "hard"]
    easy_w, hard_w = (float(next(r["weight"] for r in rows if r["set"] == s)) for s in ("easy", "hard"))
    assert hard_w > easy_w  # the rare hard pair drawn more often

    tuned = tmp_path / "tuned"
    argv = ["review", "finetune", str(dataset), "--model", "nuclei", "--out", str(tuned)]
    assert main([*argv, "--epochs", "1", "--steps", "1", "--batch", "2", "--device", "cpu"]) == 0
    review = json.loads((tuned / "config.json").read_text())["provenance"]["review"]
    assert review["sets"] == {"easy": 2, "hard": 1} and review["dataset"] == str(dataset)
    assert review["project"] == str(project) and review["recipe"]["epochs"] == 1

    capsys.readouterr()
    assert main(["review", "predict", str(project), "--add", str(tuned), "--name", "round2", "--device", "cpu"]) == 0
    models = [m.name for m in layout.read_project(project).models]
    assert models == ["nuclei", "again", "round2"]
    assert all(layout.prediction_tif(project, "round2", p).is_file() for p in patches)
    # ratings of the first round are kept; the new model waits for its own
    assert layout.read_ratings(project, "ana")[(patches[0], "nuclei")] == "good"


def test_mistakes_are_one_line_and_change_nothing(project, tmp_path, capsys):
    slide = require_shared("wsi", "CMU-1-Small-Region.svs")
    before = (project / "project.json").read_text()
    capsys.readouterr()
    assert main(["review", "new", str(project), "--slides", str(slide), "--models", "nuclei"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nephro: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert (project / "project.json").read_text() == before

    assert main(["review", "status", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nephro: error:") and err.count("\n") == 1

    out = tmp_path / "none"
    assert main(["review", "finetune", str(tmp_path), "--model", "nuclei", "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not out.exists()
