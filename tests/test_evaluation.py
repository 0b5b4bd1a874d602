"""Metrics against hand-computed cases and an independent brute force."""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage

from napari_nephro.evaluation import (
    match_instances,
    object_table,
    per_crop,
    pixel_scores,
    pixel_scores_per_class,
    summarize,
    tp_fp_fn_map,
)


def test_dice_and_iou_by_hand():
    truth = np.zeros((10, 10), int)
    pred = np.zeros((10, 10), int)
    truth[0:4, 0:5] = 1  # 20 px
    pred[2:6, 0:5] = 7  # 20 px, 10 shared
    s = pixel_scores(pred, truth)
    assert (s.tp, s.fp, s.fn) == (10, 10, 10)
    assert s.dice == pytest.approx(0.5) and s.iou == pytest.approx(1 / 3)


def test_empty_prediction_and_truth_are_undefined_not_perfect():
    empty = np.zeros((5, 5), int)
    s = pixel_scores(empty, empty)
    assert s.dice is None and s.iou is None
    m = match_instances(empty, empty)
    assert m.precision is None and m.recall is None and m.f1 is None and m.mean_matched_iou is None
    one = empty.copy()
    one[1, 1] = 1
    assert match_instances(empty, one).recall == 0 and match_instances(empty, one).precision is None


def test_blockwise_dask_scores_equal_numpy():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, (300, 410))
    pred = rng.integers(0, 4, (300, 410))
    names = ["normal", "segmental sclerosis", "global sclerosis"]
    eager = pixel_scores_per_class(pred, truth, names)
    lazy = pixel_scores_per_class(da.from_array(pred, chunks=64), da.from_array(truth, chunks=(100, 37)), names)
    assert eager == lazy
    for c, name in enumerate(names, start=1):
        tp = np.sum((pred == c) & (truth == c))
        denom = np.sum(pred == c) + np.sum(truth == c)
        assert eager[name].dice == pytest.approx(2 * tp / denom)
    assert pixel_scores(da.from_array(pred, chunks=50), truth) == pixel_scores(pred, truth)


def test_tp_fp_fn_map_colours_each_pixel():
    truth = np.array([[1, 1, 0, 0]])
    pred = np.array([[1, 0, 1, 0]])
    np.testing.assert_array_equal(tp_fp_fn_map(pred, truth), [[1, 3, 2, 0]])
    lazy = tp_fp_fn_map(da.from_array(pred, chunks=2), da.from_array(truth, chunks=2))
    np.testing.assert_array_equal(lazy.compute(), [[1, 3, 2, 0]])


def test_shapes_must_match():
    with pytest.raises(ValueError, match="differs from ground-truth shape"):
        match_instances(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError, match="differs"):
        pixel_scores(np.zeros((3, 3)), np.zeros((4, 3)))


def _brute_force(pred, truth, threshold):
    """Every one-to-one assignment: most matches first, then the largest IoU sum."""
    t_ids = [i for i in np.unique(truth) if i]
    p_ids = [i for i in np.unique(pred) if i]
    iou = {}
    for t in t_ids:
        for p in p_ids:
            a, b = truth == t, pred == p
            iou[t, p] = (a & b).sum() / (a | b).sum()
    best = (0, 0.0)
    for k in range(min(len(t_ids), len(p_ids)), 0, -1):
        for ts in itertools.combinations(t_ids, k):
            for ps in itertools.permutations(p_ids, k):
                values = [iou[t, p] for t, p in zip(ts, ps, strict=True)]
                if all(v >= threshold for v in values):
                    best = max(best, (k, sum(values)))
        if best[0]:
            break
    return best, len(t_ids), len(p_ids)


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5, 0.7])
def test_matching_equals_brute_force_on_random_instance_maps(threshold):
    rng = np.random.default_rng(int(threshold * 10))
    for _ in range(25):
        truth = _random_instances(rng, 5)
        pred = _random_instances(rng, 5)
        (k, iou_sum), n_true, n_pred = _brute_force(pred, truth, threshold)
        m = match_instances(pred, truth, threshold)
        assert m.tp == k and m.fn == n_true - k and m.fp == n_pred - k
        assert sum(p[2] for p in m.pairs) == pytest.approx(iou_sum)
        if k:
            assert m.f1 == pytest.approx(2 * k / (n_true + n_pred))
            assert m.panoptic_quality == pytest.approx(iou_sum / (k + (n_pred - k) / 2 + (n_true - k) / 2))


def _random_instances(rng, max_objects):
    out = np.zeros((24, 24), int)
    for i in range(1, rng.integers(1, max_objects + 1) + 1):
        y, x = rng.integers(0, 18, 2)
        h, w = rng.integers(3, 9, 2)
        out[y : y + h, x : x + w] = i
    # relabel so every id present is an object (later boxes may hide earlier ones)
    return np.searchsorted(np.unique(out), out)


def test_matching_ten_thousand_objects():
    labels, n = ndimage.label(np.kron(np.ones((100, 100)), np.pad(np.ones((4, 4)), 1)))
    shifted = np.roll(labels, 1, axis=1)  # each object moved by one pixel: IoU 12/20 = 0.6
    m = match_instances(shifted, labels, 0.5)
    assert n == 10_000 and m.tp == 10_000 and m.mean_matched_iou == pytest.approx(0.6)


def test_object_table_and_per_crop():
    truth = np.zeros((40, 40), int)
    truth[5:15, 5:15] = 1
    truth[25:35, 25:35] = 2
    pred = np.zeros_like(truth)
    pred[5:15, 5:15] = 9
    m = match_instances(pred, truth)
    rows = object_table(m, truth_classes={1: "normal", 2: "global sclerosis"}, mpp=0.5)
    by = {(r["side"], r["id"]): r for r in rows}
    assert by["truth", 1]["outcome"] == "TP" and by["truth", 1]["matched_id"] == 9 and by["truth", 1]["iou"] == 1.0
    assert by["truth", 2]["outcome"] == "FN" and by["truth", 2]["class"] == "global sclerosis"
    assert by["truth", 1]["area_um2"] == pytest.approx(100 * 0.25)
    crops = per_crop(pred, truth, margin=0.25)
    assert [c["dice"] for c in crops] == [1.0, 0.0]
    assert crops[0]["box"] == [3, 3, 17, 17]  # the 10 px box [5, 15) grown by round(2.5) = 2 px each side


def test_summary_mean_and_std_skip_undefined():
    s = summarize([{"dice": 0.5}, {"dice": 0.7}, {"dice": None}], keys=["dice"])
    assert s["dice"]["mean"] == pytest.approx(0.6) and s["dice"]["n"] == 2
    assert s["dice"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_matching_agrees_with_stardist_on_real_nuclei(threshold):
    """stardist.matching (an independent implementation) gives the same counts and scores."""
    from scipy import ndimage
    from stardist.matching import matching

    from conftest import require_shared
    from napari_nephro.annotations import read_label_image

    truth = read_label_image(require_shared("nuclei", "miccai2015_tcga", "image03_labels.tif")).astype(np.int32)
    pred = ndimage.grey_erosion(np.roll(truth, (2, -1), axis=(0, 1)), size=3)
    pred[:40, :40] = 0  # some misses
    ref = matching(truth, pred, thresh=threshold)
    ours = match_instances(pred, truth, threshold)
    assert (ours.tp, ours.fp, ours.fn) == (ref.tp, ref.fp, ref.fn) and ref.tp >= 20
    assert ours.precision == pytest.approx(ref.precision) and ours.recall == pytest.approx(ref.recall)
    assert ours.f1 == pytest.approx(ref.f1)
    assert ours.mean_matched_iou == pytest.approx(ref.mean_matched_score)
    assert ours.panoptic_quality == pytest.approx(ref.panoptic_quality)
