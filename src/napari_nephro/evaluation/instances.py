"""Instance matching at an IoU threshold: optimal one-to-one (Hungarian), fast on many objects.

IoUs come from one joint histogram of overlapping (truth, prediction) pixel pairs,
gathered block by block, so only pairs that touch are ever considered and a
whole-slide label image is never in memory. Above an IoU of 0.5 each object can
match at most one other and the matching is unique; below it, each connected group
of candidates is solved with the Hungarian algorithm, maximising first the number
of matches and then their IoU (as stardist.matching does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ._ratio import ratio
from .blockwise import PairCounts, block_cells, blocks, parallel_map, read_block


@dataclass
class MatchResult:
    threshold: float
    n_true: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    precision: float | None
    recall: float | None
    f1: float | None
    mean_matched_iou: float | None
    panoptic_quality: float | None
    pairs: list[tuple[int, int, float]] = field(default_factory=list)  # (truth id, prediction id, IoU)
    true_areas: dict[int, int] = field(default_factory=dict)  # object id -> pixels, for the object table
    pred_areas: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        keys = (
            "threshold",
            "n_true",
            "n_pred",
            "tp",
            "fp",
            "fn",
            "precision",
            "recall",
            "f1",
            "mean_matched_iou",
            "panoptic_quality",
        )
        return {k: getattr(self, k) for k in keys}


def overlap_table(truth, pred):
    """Object ids, areas, and the overlapping (truth, pred, intersection) triples.

    Counted block by block (numpy, zarr or dask arrays, or polygons drawn on demand),
    so the memory needed is that of a block and of the objects, not of the image.
    """
    counts = PairCounts()
    if len(np.shape(truth)) == 2:

        def cells(box):
            return block_cells(read_block(truth, *box), read_block(pred, *box))

        for part in parallel_map(cells, blocks(tuple(np.shape(truth)))):
            counts.add_cells(part)
    else:  # not an image: one block
        counts.add(np.asarray(truth), np.asarray(pred))
    return counts.table()


def match_instances(pred, truth, iou_threshold: float = 0.5) -> MatchResult:
    """Match predicted to true objects one-to-one where IoU >= iou_threshold."""
    if tuple(np.shape(pred)) != tuple(np.shape(truth)):
        raise ValueError(f"prediction shape {np.shape(pred)} differs from ground-truth shape {np.shape(truth)}")
    _check_threshold(iou_threshold)
    return match_from_table(overlap_table(truth, pred), iou_threshold)


def _check_threshold(iou_threshold: float) -> None:
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"IoU threshold must be in (0, 1], not {iou_threshold}")


def match_from_table(table, iou_threshold: float = 0.5) -> MatchResult:
    """The one-to-one matching of an `overlap_table` (or `PairCounts.table()`) at an IoU threshold."""
    _check_threshold(iou_threshold)
    true_ids, t_area, pred_ids, p_area, ti, pi, inter = table
    iou = inter / (t_area[ti] + p_area[pi] - inter)
    ok = iou >= iou_threshold
    ti, pi, iou = ti[ok], pi[ok], iou[ok]
    chosen = _assign(ti, pi, iou, len(true_ids), len(pred_ids), iou_threshold)
    pairs = [(int(true_ids[ti[k]]), int(pred_ids[pi[k]]), float(iou[k])) for k in chosen]
    tp = len(pairs)
    fp, fn = len(pred_ids) - tp, len(true_ids) - tp
    sum_iou = float(sum(p[2] for p in pairs))
    return MatchResult(
        threshold=iou_threshold,
        n_true=len(true_ids),
        n_pred=len(pred_ids),
        tp=tp,
        fp=fp,
        fn=fn,
        precision=ratio(tp, tp + fp),
        recall=ratio(tp, tp + fn),
        f1=ratio(2 * tp, 2 * tp + fp + fn),
        mean_matched_iou=ratio(sum_iou, tp),
        panoptic_quality=ratio(sum_iou, tp + fp / 2 + fn / 2),
        pairs=pairs,
        true_areas=dict(zip(true_ids.tolist(), t_area.tolist(), strict=True)),
        pred_areas=dict(zip(pred_ids.tolist(), p_area.tolist(), strict=True)),
    )


def _assign(ti, pi, iou, n_true, n_pred, threshold) -> list[int]:
    """Indices of the chosen candidate pairs."""
    if len(iou) == 0:
        return []
    if threshold > 0.5:  # each object overlaps at most one other by more than half: already one-to-one
        return list(range(len(iou)))
    graph = coo_matrix((np.ones(len(iou)), (ti, n_true + pi)), shape=(n_true + n_pred,) * 2)
    _, component = connected_components(graph, directed=False)
    chosen = []
    order = np.argsort(component[ti], kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(component[ti][order])) + 1)
    for group in groups:
        if len(group) == 1:
            chosen.append(int(group[0]))
            continue
        rows, r_inv = np.unique(ti[group], return_inverse=True)
        cols, c_inv = np.unique(pi[group], return_inverse=True)
        cost = np.zeros((len(rows), len(cols)))
        # more matches first, then higher IoU: a match is worth 1 + IoU / (2 * size)
        cost[r_inv, c_inv] = -(1 + iou[group] / (2 * max(len(rows), len(cols))))
        r, c = linear_sum_assignment(cost)
        lookup = {(a, b): int(k) for a, b, k in zip(r_inv, c_inv, group, strict=True)}
        chosen.extend(lookup[(a, b)] for a, b in zip(r, c, strict=True) if (a, b) in lookup)
    return sorted(chosen)


def aggregated_jaccard(pred, truth, *, parts: bool = False):
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017), the MoNuSeg challenge's measure.

    Each true nucleus is paired with the prediction of highest IoU with it (a
    prediction may serve several); the index is the sum of those intersections over
    the sum of their unions plus the area of every prediction never chosen. Unlike
    F1 it punishes a merge or a split by its pixels. `parts`: (intersection, union)
    instead of their ratio, to pool several images.
    """
    if tuple(np.shape(pred)) != tuple(np.shape(truth)):
        raise ValueError(f"prediction shape {np.shape(pred)} differs from ground-truth shape {np.shape(truth)}")
    true_ids, t_area, pred_ids, p_area, ti, pi, inter = overlap_table(truth, pred)
    inter = inter.astype(np.float64)
    iou = inter / (t_area[ti] + p_area[pi] - inter) if len(inter) else inter
    best = np.full(len(true_ids), -1)
    if len(iou):
        order = np.lexsort((-iou, ti))  # per true object, its highest IoU first
        first = np.r_[True, ti[order][1:] != ti[order][:-1]]
        chosen = order[first]
        best[ti[chosen]] = chosen
    total_inter = float(inter[best[best >= 0]].sum())
    union = float(t_area.sum()) + float(p_area[pi[best[best >= 0]]].sum()) - total_inter
    used = np.zeros(len(pred_ids), bool)
    used[pi[best[best >= 0]]] = True
    union += float(p_area[~used].sum())
    if parts:
        return total_inter, union
    return total_inter / union if union else 1.0
