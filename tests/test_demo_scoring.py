"""The demo's score on the sample, without a model: found vs annotated glomeruli, and the overview's colours."""

from __future__ import annotations

import numpy as np
import shapely
from PIL import Image

from napari_nephro.annotations import Annotation, AnnotationSet
from napari_nephro.evaluation.tpfpfn import FN, FP, TP, TPFPFN_COLORS
from napari_nephro.io import open_slide
from napari_nephro.pipelines.demo import describe_match, match_objects, write_overview
from napari_nephro.sample import SAMPLE_SHAPE, sample_annotations, sample_slide_path


def _found_and_truth():
    """Five of the six glomeruli found (one shifted by a tenth of its size), one missed, one false positive."""
    truth = sample_annotations()
    found = [truth[0], Annotation(shapely.affinity.translate(truth[1].geometry, xoff=20), "glomerulus")]
    found += list(truth)[2:5]
    false = Annotation(shapely.box(1700, 1000, 1800, 1100), "glomerulus")  # tissue, no glomerulus
    return AnnotationSet([*found, false]), truth


def test_found_objects_are_matched_one_to_one_to_the_annotations():
    found, truth = _found_and_truth()
    match = match_objects(found, truth, SAMPLE_SHAPE)
    assert (match.n_true, match.n_pred, match.tp, match.fp, match.fn) == (6, 6, 5, 1, 1)
    assert {t for t, _, _ in match.pairs} == {1, 2, 3, 4, 5}
    assert describe_match(match) == "5 of 6 annotated glomeruli found (IoU ≥ 0.5), 1 false positive"
    # a found glomerulus shifted by more than half its width is no longer the annotated one
    far = AnnotationSet([Annotation(shapely.affinity.translate(truth[0].geometry, xoff=300), "glomerulus")])
    assert match_objects(far, truth, SAMPLE_SHAPE).tp == 0


def test_the_overview_colours_found_false_and_missed_glomeruli(tmp_path):
    found, truth = _found_and_truth()
    slide = open_slide(sample_slide_path())
    match = match_objects(found, truth, SAMPLE_SHAPE)
    path = write_overview(slide, found, tmp_path / "o.png", truth=truth, match=match)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    scale = max(SAMPLE_SHAPE) / max(pixels.shape[:2])

    def share(colour, annotation) -> float:
        x0, y0, x1, y1 = (round(v / scale) for v in annotation.bounds)
        box = pixels[max(0, y0 - 2) : y1 + 2, max(0, x0 - 2) : x1 + 2]
        return float(np.all(box == TPFPFN_COLORS[colour], axis=-1).mean())

    assert share(TP, found[0]) > 0.005 and share(FP, found[0]) == 0
    assert share(FP, found[5]) > 0.005 and share(TP, found[5]) == 0  # the false positive is yellow
    assert share(FN, truth[5]) > 0.005  # the missed glomerulus is outlined in red
    assert share(FN, truth[0]) == 0
