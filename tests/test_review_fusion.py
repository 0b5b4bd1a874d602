"""Ratings analysis of a review project: consensus, fusion, agreement, figures, easy / hard sets, export.

Projects are made by hand with layout's writers (project.json, patches.csv,
patch PNGs, label TIFFs drawn with numpy, ratings appended line by line), so
every expected number below is computed by hand from what the test drew.
"""

from __future__ import annotations

import csv
import json
import sys
import time

import numpy as np
import pytest
from PIL import Image

from napari_nephro.review import layout
from napari_nephro.review.consensus import Disagreement, adjudicate, disagreements, effective_ratings
from napari_nephro.review.export import FIELDS, export_tiles
from napari_nephro.review.figures import FIGURES, TABLES, write_results
from napari_nephro.review.fusion import (
    agreement_matrix,
    agreement_shares,
    fuse,
    fused_counts,
    fusion_report,
    rating_counts,
)
from napari_nephro.review.oversampling import oversampling_weights
from napari_nephro.review.sets import (
    corrected,
    corrections,
    easy_pairs,
    hard_patches,
    save_correction,
    starting_point,
)
from napari_nephro.review.stats import patch_stats

MODELS = ["A", "B", "C"]
SIZE = 96
MPP = 0.5


def make_project(root, n_patches: int, *, task: str = "nuclei", size: int = SIZE, models=MODELS):
    project = layout.Project(
        task=task,
        size=size,
        mpp=MPP,
        seed=0,
        sampling="random",
        slides=[layout.SlideEntry("s1", "/slides/kidney1.svs", 0.25)],
        models=[layout.ModelEntry(m, f"spec-{m}", family="nuclei") for m in models],
    )
    root.mkdir(parents=True, exist_ok=True)
    layout.write_project(root, project)
    patches = [
        layout.Patch(layout.patch_id(i), "s1", 100.0 * i, 50.0 * i, 2 * size, 2 * size) for i in range(n_patches)
    ]
    layout.write_patches(root, patches)
    rng = np.random.default_rng(0)
    for p in patches:
        path = layout.patch_png(root, p.patch)
        path.parent.mkdir(parents=True, exist_ok=True)
        pink = np.stack([rng.integers(180, 230, (size, size)), rng.integers(90, 150, (size, size))] * 2, -1)[..., :3]
        Image.fromarray(pink.astype(np.uint8)).save(path)
    return [p.patch for p in patches]


def squares(corners, size: int = SIZE, side: int = 10) -> np.ndarray:
    """Instance ids 1..n, one side x side square at each (row, col)."""
    labels = np.zeros((size, size), np.uint32)
    for k, (r, c) in enumerate(corners, start=1):
        labels[r : r + side, c : c + side] = k
    return labels


def predict(root, model, patch, labels):
    layout.write_labels(layout.prediction_tif(root, model, patch), labels)


def rate(root, rater, table: dict[str, str]):
    """table: patch -> ratings of A B C as a string, '-' for unrated ('gbm' = A good, B bad, C medium)."""
    letters = {"g": "good", "m": "medium", "b": "bad"}
    for patch, given in table.items():
        for model, letter in zip(MODELS, given, strict=True):
            if letter != "-":
                layout.append_rating(root, rater, patch, model, letters[letter])


FOUR = [(5, 5), (5, 50), (50, 5), (50, 50)]
ELSEWHERE = [(75, 75), (30, 75)]
# B and C find the same four squares; A finds two of them and two others:
# A vs B: tp 2, fp 2, fn 2 -> F1 = 2*2 / (2*2 + 2 + 2) = 0.5; B vs C: F1 1; A vs C: 0.5.
# Mean agreement: A (0.5 + 0.5) / 2 = 0.5, B (0.5 + 1) / 2 = 0.75, C 0.75.
A_LABELS = squares(FOUR[:2] + ELSEWHERE)
B_LABELS = squares(FOUR)


# --- fusion and agreement on hand-made ratings ---------------------------------------------------------------

# patch: A B C     fused
# p0001: g b b  -> good (any good)
# p0002: b b b  -> bad (all bad)
# p0003: m b g  -> good
# p0004: m m m  -> medium
# p0005: g g m  -> good
# p0006: b - b  -> undecided: B unrated could still be good
TABLE = {"p0001": "gbb", "p0002": "bbb", "p0003": "mbg", "p0004": "mmm", "p0005": "ggm", "p0006": "b-b"}


def test_fused_ratings_counts_and_agreement_equal_the_hand_computed_values(tmp_path):
    patches = make_project(tmp_path, 6)
    rate(tmp_path, "ann", TABLE)
    ratings = effective_ratings(tmp_path)

    fused = fuse(ratings, patches, MODELS)
    assert fused == {
        "p0001": "good",
        "p0002": "bad",
        "p0003": "good",
        "p0004": "medium",
        "p0005": "good",
        "p0006": None,
    }
    assert fused_counts(fused) == {"good": 3, "medium": 1, "bad": 1}
    assert rating_counts(ratings, MODELS) == {
        "A": {"good": 2, "medium": 2, "bad": 2},
        "B": {"good": 1, "medium": 1, "bad": 3},
        "C": {"good": 1, "medium": 2, "bad": 3},
    }
    # A-B over p1..p5 (p6 has no B): equal on p2, p4, p5 -> 3/5; A-C over p1..p6: p2, p4, p6 -> 3/6;
    # B-C over p1..p5: p1, p2, p4 -> 3/5
    expected = np.array([[1, 3 / 5, 3 / 6], [3 / 5, 1, 3 / 5], [3 / 6, 3 / 5, 1]])
    np.testing.assert_allclose(agreement_matrix(ratings, patches, MODELS), expected)
    # over the 5 fully rated patches: all agree p2, p4; some agree p1 (b b), p5 (g g); none agree p3 (m b g)
    assert agreement_shares(ratings, patches, MODELS) == pytest.approx(
        {"all agree": 2 / 5, "some agree": 2 / 5, "none agree": 1 / 5}
    )

    report = fusion_report(tmp_path)
    assert report.fused == fused and report.complete == 5 and report.undecided == 1
    np.testing.assert_allclose(report.agreement, expected)
    assert "fused: good 3, medium 1, bad 1, unrated 1" in report.summary()


def test_a_medium_rating_waits_for_the_other_models_but_a_good_one_decides():
    assert fuse({("p", "A"): "medium"}, ["p"], ["A", "B"]) == {"p": None}
    assert fuse({("p", "B"): "good"}, ["p"], ["A", "B"]) == {"p": "good"}
    assert fuse({("p", "A"): "bad", ("p", "B"): "medium"}, ["p"], ["A", "B"]) == {"p": "medium"}
    assert agreement_shares({}, ["p"], ["A", "B"]) == {"all agree": None, "some agree": None, "none agree": None}
    assert np.isnan(agreement_matrix({("p", "A"): "bad"}, ["p"], ["A", "B"])[0, 1])


# --- consensus between raters ----------------------------------------------------------------------------------


def test_two_raters_agree_disagree_and_the_adjudicator_settles(tmp_path):
    make_project(tmp_path, 3)
    rate(tmp_path, "ann", {"p0001": "gg-", "p0002": "m--"})
    rate(tmp_path, "bob", {"p0001": "bg-", "p0003": "--b"})

    ratings = effective_ratings(tmp_path)
    assert ratings == {("p0001", "B"): "good", ("p0002", "A"): "medium", ("p0003", "C"): "bad"}
    assert disagreements(tmp_path) == [Disagreement("p0001", "A", {"ann": "good", "bob": "bad"})]
    assert effective_ratings(tmp_path, ["ann"])[("p0001", "A")] == "good"  # one rater's view

    adjudicate(tmp_path, "p0001", "A", "medium")
    adjudicate(tmp_path, "p0003", "C", "good")  # the adjudicator wins even where raters agreed
    assert disagreements(tmp_path) == []
    ratings = effective_ratings(tmp_path)
    assert ratings[("p0001", "A")] == "medium" and ratings[("p0003", "C")] == "good"
    assert layout.ADJUDICATOR in layout.raters(tmp_path)
    assert fusion_report(tmp_path).disagreements == 0

    layout.append_rating(tmp_path, "bob", "p0002", "A", "bad")  # a new disagreement, not adjudicated
    assert [(d.patch, d.model) for d in disagreements(tmp_path)] == [("p0002", "A")]
    assert ("p0002", "A") not in effective_ratings(tmp_path)


# --- oversampling ----------------------------------------------------------------------------------------------


def test_oversampling_weights_of_a_50_to_1_easy_hard_set_follow_the_cellvit_formula():
    groups = ["easy"] * 50 + ["hard"]
    weights = oversampling_weights(groups, 0.85)
    # N = 51: easy 51 / (0.85 * 50 + 0.15 * 51) = 51 / 50.15; hard 51 / (0.85 * 1 + 0.15 * 51) = 51 / 8.5 = 6
    np.testing.assert_allclose(weights[:50], 51 / 50.15)
    assert weights[50] == pytest.approx(6.0)
    np.testing.assert_array_equal(oversampling_weights(groups, 0.0), np.ones(51))
    np.testing.assert_allclose(oversampling_weights(groups, 1.0), [51 / 50] * 50 + [51.0])  # fully balanced
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(layout.ReviewError, match="gamma"):
            oversampling_weights(groups, bad)


# --- measured counts and the easy pair rules ----------------------------------------------------------------------


def test_patch_stats_count_objects_and_match_the_predictions_at_iou_half(tmp_path):
    make_project(tmp_path, 1)
    predict(tmp_path, "A", "p0001", A_LABELS)
    predict(tmp_path, "B", "p0001", B_LABELS)
    predict(tmp_path, "C", "p0001", B_LABELS)
    stats = patch_stats(tmp_path, "p0001", MODELS)
    assert stats.objects == {"A": 4, "B": 4, "C": 4}
    assert stats.f1("A", "B") == pytest.approx(0.5) and stats.f1("B", "C") == pytest.approx(1.0)
    assert stats.mean_agreement("A") == pytest.approx(0.5) and stats.mean_agreement("B") == pytest.approx(0.75)


def test_patch_stats_on_a_512_px_patch_with_three_models_take_well_under_a_second(tmp_path):
    make_project(tmp_path, 1, size=512)
    rng = np.random.default_rng(1)
    corners = [(r, c) for r in range(0, 500, 25) for c in range(0, 500, 25)]  # 400 nuclei
    for model, shift in zip(MODELS, (0, 2, 4), strict=True):
        kept = [(r + shift, c) for r, c in corners if rng.random() < 0.9]
        predict(tmp_path, model, "p0001", squares(kept, 512, 12))
    start = time.perf_counter()
    stats = patch_stats(tmp_path, "p0001")
    assert time.perf_counter() - start < 1.0
    assert all(300 < n < 400 for n in stats.objects.values()) and len(stats.agreement) == 6


def test_easy_pair_rules_pick_the_documented_model(tmp_path):
    make_project(tmp_path, 2)
    for patch in ("p0001", "p0002"):
        predict(tmp_path, "A", patch, A_LABELS if patch == "p0001" else B_LABELS)
        predict(tmp_path, "B", patch, B_LABELS)
        predict(tmp_path, "C", patch, B_LABELS)
    rate(tmp_path, "ann", {"p0001": "ggb", "p0002": "ggb"})
    ratings = effective_ratings(tmp_path)

    # p0001: A (mean F1 0.5) and B (0.75) are good: agreement picks B. p0002: all alike, a tie: the first, A
    pairs = easy_pairs(tmp_path, ratings)
    assert [(p.patch, p.model) for p in pairs] == [("p0001", "B"), ("p0002", "A")]
    assert [p.model for p in easy_pairs(tmp_path, ratings, rule="order")] == ["A", "A"]
    assert [p.model for p in easy_pairs(tmp_path, ratings, rule="order", order=["C", "B"])] == ["B", "B"]
    assert [p.model for p in easy_pairs(tmp_path, ratings, rule="agreement", order=["B"])] == ["B", "B"]
    with pytest.raises(layout.ReviewError, match="no model 'Z'"):
        easy_pairs(tmp_path, ratings, rule="order", order=["Z"])
    with pytest.raises(layout.ReviewError, match="rule"):
        easy_pairs(tmp_path, ratings, rule="best")


def test_a_correction_starts_from_the_best_rated_then_the_most_agreeing_prediction(tmp_path):
    make_project(tmp_path, 2)
    for patch in ("p0001", "p0002"):
        predict(tmp_path, "A", patch, A_LABELS)
        predict(tmp_path, "B", patch, B_LABELS)
        predict(tmp_path, "C", patch, B_LABELS)
    rate(tmp_path, "ann", {"p0001": "bbb", "p0002": "mbb"})
    ratings = effective_ratings(tmp_path)
    assert hard_patches(tmp_path, ratings) == ["p0001"]
    assert starting_point(tmp_path, "p0001", ratings) == "B"  # all bad: B and C agree most (0.75), B first
    assert starting_point(tmp_path, "p0002", ratings) == "A"  # the only medium one, though it agrees least


# --- corrections and the export ---------------------------------------------------------------------------------


def _export_project(root):
    """p1-p3 easy (A, B and A good), p4 fused bad and corrected, p5 fused bad not corrected, p6 medium."""
    patches = make_project(root, 6)
    for k, patch in enumerate(patches):
        predict(root, "A", patch, squares(FOUR[: 1 + k % 4]))
        predict(root, "B", patch, squares(FOUR[:2]))
        predict(root, "C", patch, squares(ELSEWHERE))
    rate(root, "ann", {"p0001": "gbb", "p0002": "bgm", "p0003": "gmm", "p0004": "bbb", "p0005": "bbb", "p0006": "mbm"})
    return patches


def test_save_correction_renumbers_ids_and_refuses_a_wrong_shape(tmp_path):
    _export_project(tmp_path)
    drawn = np.zeros((SIZE, SIZE), np.int64)
    drawn[10:20, 10:20] = 7
    drawn[40:60, 40:60] = 3
    with pytest.raises(layout.ReviewError, match="96x96"):
        save_correction(tmp_path, "p0004", drawn[:50], rater="ann", started_from="B")
    with pytest.raises(layout.ReviewError, match="no model"):
        save_correction(tmp_path, "p0004", drawn, rater="ann", started_from="Z")
    assert corrected(tmp_path) == set()

    path = save_correction(tmp_path, "p0004", drawn, rater="ann", started_from="B")
    saved = layout.read_labels(path)
    np.testing.assert_array_equal(saved, np.where(drawn == 3, 1, np.where(drawn == 7, 2, 0)))
    assert corrected(tmp_path) == {"p0004"}
    row = corrections(tmp_path)["p0004"]
    assert (row["rater"], row["started_from"], row["objects"]) == ("ann", "B", "2")


def test_export_writes_easy_and_hard_pairs_with_the_oversampling_weights(tmp_path):
    from napari_nephro.training.nuclei_data import nucleus_images

    root = tmp_path / "project"
    _export_project(root)
    correction = squares([(20, 20), (60, 30), (70, 70)])
    save_correction(root, "p0004", correction, rater="ann", started_from="B")
    predict(root, "A", "p0003", squares(FOUR[:3]) * 3)  # ids 3, 6, 9: exported as 1, 2, 3
    notes = []
    out = export_tiles(root, tmp_path / "tiles", on_note=notes.append)

    with open(out / "tiles.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == FIELDS
        rows = list(reader)
    assert [(r["patch"], r["set"], r["model"]) for r in rows] == [
        ("p0001", "easy", "A"),
        ("p0002", "easy", "B"),
        ("p0003", "easy", "A"),
        ("p0004", "hard", "corrected"),
    ]
    # N = 4, 3 easy and 1 hard: easy 4 / (0.85 * 3 + 0.15 * 4) = 4 / 3.15, hard 4 / (0.85 + 0.6) = 4 / 1.45
    weights = [float(r["weight"]) for r in rows]
    np.testing.assert_allclose(weights, [4 / 3.15] * 3 + [4 / 1.45])
    assert notes and "1 fused-bad" in notes[0]  # p0005 waits for its correction

    expected = {
        "p0001": layout.read_labels(layout.prediction_tif(root, "A", "p0001")),
        "p0002": layout.read_labels(layout.prediction_tif(root, "B", "p0002")),
        "p0003": squares(FOUR[:3]),
        "p0004": correction,
    }
    for row in rows:
        mask = np.asarray(Image.open(out / row["mask"]))
        assert mask.dtype == np.uint16
        np.testing.assert_array_equal(mask, expected[row["patch"]])
        image = np.asarray(Image.open(out / row["image"]))
        np.testing.assert_array_equal(image, np.asarray(Image.open(layout.patch_png(root, row["patch"]))))
        assert row["source"] == "kidney1.svs" and row["values"] == " ".join(map(str, range(1, mask.max() + 1)))

    meta = json.loads((out / "dataset.json").read_text())
    assert meta["tiles"] == 4 and meta["tile_size"] == SIZE and meta["mpp"] == MPP
    assert meta["mask_values"] == "instance" and meta["classes"] == {}
    review = meta["review"]
    assert review["sets"] == {"easy": 3, "hard": 1} and review["gamma"] == 0.85 and review["rule"] == "agreement"
    assert review["raters"] == ["ann"] and review["project"] == str(root) and review["uncorrected"] == 1

    # the training reader of `nephro train --task nuclei` takes the export as it is
    images = nucleus_images(out / "masks", out / "images", mpp=MPP, image_mpp=MPP)
    assert sorted(n.name for n in images) == ["p0001", "p0002", "p0003", "p0004"]
    for item in images:
        np.testing.assert_array_equal(item.labels, expected[item.name])


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_export_refuses_nothing_an_existing_folder_and_leaves_nothing_half_written(tmp_path):
    root = tmp_path / "project"
    _export_project(root)
    with pytest.raises(layout.ReviewError, match=r"nothing to export.*2 fused-bad"):
        export_tiles(root, tmp_path / "hard", sets=("hard",))
    assert not (tmp_path / "hard").exists()

    out = export_tiles(root, tmp_path / "easy", sets=("easy",), gamma=0.85)
    rows = _rows(out / "tiles.csv")
    assert {r["set"] for r in rows} == {"easy"} and all(float(r["weight"]) == pytest.approx(1.0) for r in rows)
    with pytest.raises(layout.ReviewError, match="overwrite"):
        export_tiles(root, out)
    with pytest.raises(layout.ReviewError, match="gamma"):
        export_tiles(root, tmp_path / "g", gamma=2)
    with pytest.raises(layout.ReviewError, match="part of the project"):
        export_tiles(root, root / "predictions", overwrite=True)

    layout.write_labels(layout.prediction_tif(root, "B", "p0002"), np.zeros((SIZE, SIZE - 1)))  # breaks mid-export
    with pytest.raises(layout.ReviewError, match="p0002"):
        export_tiles(root, out, overwrite=True)
    assert len(_rows(out / "tiles.csv")) == len(rows)  # the old export kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["easy", "project"]  # no temporary folder left


def test_glomerulus_export_writes_class_values_from_the_classes_file(tmp_path):
    root = tmp_path / "project"
    make_project(root, 2, task="glomeruli", models=["A", "B"])
    for patch in ("p0001", "p0002"):
        predict(root, "A", patch, squares(FOUR[:3]))
        predict(root, "B", patch, squares(FOUR[:3]))
    layout.prediction_classes(root, "A", "p0001").write_text(json.dumps({"1": "sclerotic", "2": "normal"}))
    for patch in ("p0001", "p0002"):
        for model in ("A", "B"):
            layout.append_rating(root, "ann", patch, model, "good")
    out = export_tiles(root, tmp_path / "tiles", rule="order")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["mask_values"] == "class" and meta["classes"] == {"1": "sclerotic", "2": "normal"}
    ids = squares(FOUR[:3])
    first = np.asarray(Image.open(out / "masks" / "p0001.png"))
    np.testing.assert_array_equal(first, np.select([ids == 1, ids == 2, ids == 3], [1, 2, 1], 0))  # 3: no class -> 1
    second = np.asarray(Image.open(out / "masks" / "p0002.png"))  # no classes file: every object 1
    np.testing.assert_array_equal(second, (ids > 0).astype(np.uint8))


# --- tables and figures -----------------------------------------------------------------------------------------


def test_results_are_valid_pngs_and_tables_with_the_reports_numbers(tmp_path):
    make_project(tmp_path, 6)
    rate(tmp_path, "ann", TABLE)
    had_pyplot = "matplotlib.pyplot" in sys.modules
    written = write_results(tmp_path)
    assert sorted(p.name for p in written) == sorted(TABLES + FIGURES)
    assert all(p.parent == layout.results_dir(tmp_path) for p in written)
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules  # no global figure state touched
    for name in FIGURES:
        with Image.open(layout.results_dir(tmp_path) / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 200

    report = fusion_report(tmp_path)

    def table(name):
        with open(layout.results_dir(tmp_path) / name, newline="") as f:
            return list(csv.DictReader(f))

    for row in table("rating_counts.csv"):
        assert {k: int(row[k]) for k in layout.RATINGS} == report.rating_counts[row["model"]]
    fused = {r["rating"]: int(r["patches"]) for r in table("fused_counts.csv")}
    assert fused == {**report.fused_counts, "unrated": 1}
    matrix = np.array([[float(r[m]) for m in MODELS] for r in table("agreement_matrix.csv")])
    np.testing.assert_allclose(matrix, report.agreement, atol=1e-4)
    shares = {r["agreement"]: (int(r["patches"]), float(r["share"])) for r in table("agreement_shares.csv")}
    assert shares == {"all agree": (2, 0.4), "some agree": (2, 0.4), "none agree": (1, 0.2)}
    per_patch = {r["patch"]: r["fused"] for r in table("fused_ratings.csv")}
    assert per_patch == {p: r or "unrated" for p, r in report.fused.items()}

    rate(tmp_path, "ann", {"p0006": "-g-"})  # a new rating: fused again, the tables follow
    write_results(tmp_path, fusion_report(tmp_path))  # the caller's report, read once
    assert {r["patch"]: r["fused"] for r in table("fused_ratings.csv")}["p0006"] == "good"
