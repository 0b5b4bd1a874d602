"""Annotation formats on the real files, and round trips that keep every object and class."""

from __future__ import annotations

import json

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from conftest import require_shared
from napari_nephro.annotations import (
    Annotation,
    AnnotationError,
    AnnotationSet,
    rasterize,
    read_annotations,
    read_coco,
    read_geojson,
    vectorize,
    write_coco,
    write_geojson,
)
from napari_nephro.annotations.io import read_label_image
from napari_nephro.annotations.rle import rle_decode, rle_encode


def test_hubmap_geojson_has_96_glomeruli_and_round_trips(tmp_path):
    glomeruli = read_geojson(require_shared("annotations", "hubmap_aaa6a05cc_glomeruli.geojson"))
    assert len(glomeruli) == 96 and glomeruli.counts() == {"glomerulus": 96} and glomeruli.warnings == []
    out = write_geojson(glomeruli, tmp_path / "out.geojson")
    again = read_geojson(out)
    assert len(again) == 96 and again.counts() == glomeruli.counts()
    for a, b in zip(glomeruli, again, strict=True):
        assert a.geometry.equals(b.geometry)
    feature = json.loads(out.read_text())["features"][0]
    assert feature["properties"]["objectType"] == "annotation"  # what QuPath needs to import it
    assert feature["properties"]["classification"]["name"] == "glomerulus"


def test_geojson_to_labels_to_geojson_keeps_every_object_and_class(tmp_path):
    glomeruli = read_geojson(require_shared("annotations", "hubmap_aaa6a05cc_glomeruli.geojson"))
    anatomy = read_geojson(require_shared("annotations", "hubmap_aaa6a05cc_anatomical.geojson"))
    assert anatomy.counts() == {"Medulla": 1, "Cortex": 1}
    # the whole 13013 x 18484 slide at level 4 (downsample 16): no level-0 raster is built
    shape = (18484 // 16 + 1, 13013 // 16 + 1)
    labels = rasterize(glomeruli, shape, downsample=16)
    assert len(np.unique(labels)) - 1 == 96
    classes = rasterize(glomeruli, shape, downsample=16, values="class")
    back = vectorize(labels, classes=classes, downsample=16, class_names=glomeruli.classes)
    assert len(back) == 96 and back.counts() == {"glomerulus": 96}
    # each object comes back where it was, within the level's pixel size
    for a, b in zip(glomeruli, back, strict=True):
        assert a.geometry.hausdorff_distance(b.geometry) <= 16 * 1.5
    write_geojson(back, tmp_path / "back.geojson")
    assert len(read_geojson(tmp_path / "back.geojson")) == 96


def test_rasterize_a_region_equals_the_same_window_of_the_full_raster():
    glomeruli = read_geojson(require_shared("annotations", "hubmap_aaa6a05cc_glomeruli.geojson"))
    full = rasterize(glomeruli, (18484 // 8, 13013 // 8), downsample=8)
    x0, y0, w, h = 400, 1000, 300, 250  # level-3 pixels
    window = rasterize(glomeruli, (h, w), downsample=8, origin=(x0 * 8, y0 * 8))
    np.testing.assert_array_equal(window, full[y0 : y0 + h, x0 : x0 + w])
    assert window.any()


def test_rasterize_uses_pixel_centres_and_keeps_holes():
    square = Polygon([(2, 2), (8, 2), (8, 8), (2, 8)], [[(4, 4), (6, 4), (6, 6), (4, 6)]])
    labels = rasterize(AnnotationSet([Annotation(square, "x")]), (10, 10))
    expected = np.zeros((10, 10), np.uint32)
    expected[2:8, 2:8] = 1  # centres 2.5 ... 7.5 lie inside [2, 8]
    expected[4:6, 4:6] = 0  # centres 4.5, 5.5 lie in the hole
    np.testing.assert_array_equal(labels, expected)
    back = vectorize(labels)
    assert len(back) == 1 and len(back[0].polygons()[0].interiors) == 1
    np.testing.assert_array_equal(rasterize(back, (10, 10)), expected)


def test_random_label_images_survive_vectorize_and_rasterize():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(5):
        blobs = ndimage.gaussian_filter(rng.random((120, 160)), 3) > 0.52
        labels, n = ndimage.label(blobs)
        back = vectorize(labels)
        assert len(back) == n
        np.testing.assert_array_equal(rasterize(back, labels.shape) > 0, labels > 0)


def test_bupt_coco_has_66_glomeruli_in_42_images_with_classes(tmp_path):
    images = read_coco(require_shared("glomeruli", "bupt_multistain_dev", "annotations.json"))
    assert len(images) == 42
    assert sum(len(im.annotations) for im in images.values()) == 66
    counts = {}
    for im in images.values():
        for name, n in im.annotations.counts().items():
            counts[name] = counts.get(name, 0) + n
    assert counts == {"gl": 27, "gn": 17, "gm": 13, "gs": 9}
    out = write_coco({n: (im.annotations, (im.height, im.width)) for n, im in images.items()}, tmp_path / "c.json")
    again = read_coco(out)
    for name, im in images.items():
        a, b = im.annotations, again[name].annotations
        assert [x.label for x in a] == [x.label for x in b]
        for x, y in zip(a, b, strict=True):
            assert x.geometry.symmetric_difference(y.geometry).area < 1e-6 * max(1.0, x.area)


def test_coco_rle_matches_pycocotools_exactly():
    mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools is the independent reference")
    rng = np.random.default_rng(1)
    for _ in range(100):
        h, w = rng.integers(1, 50, 2)
        mask = rng.random((h, w)) < rng.random()
        reference = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle_encode(mask)["counts"] == reference["counts"].decode()
        np.testing.assert_array_equal(rle_decode(reference), mask)


def test_polygons_with_holes_are_written_to_coco_as_rle(tmp_path):
    ring = Polygon(box(10, 10, 40, 40).exterior.coords, [box(20, 20, 30, 30).exterior.coords])
    write_coco({"a.png": (AnnotationSet([Annotation(ring, "glomerulus")]), (50, 50))}, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert isinstance(data["annotations"][0]["segmentation"], dict)
    (image,) = read_coco(tmp_path / "r.json").values()
    assert len(image.annotations[0].polygons()[0].interiors) == 1


def test_aidpath_red_masks_become_instances():
    masks = sorted(require_shared("glomeruli", "aidpath_pas", "masks").glob("*.png"))
    assert len(masks) == 24
    total = sum(len(np.unique(read_label_image(p))) - 1 for p in masks)
    assert 24 <= total <= 40  # 28 glomeruli in the set; touching ones merge, fragments split


def test_miccai_label_tiffs_keep_their_instance_ids():
    path = require_shared("nuclei", "miccai2015_tcga", "image01_labels.tif")
    labels = read_label_image(path)
    assert labels.dtype == np.uint32 and labels.max() == 351 and len(read_annotations(path)) >= 300


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not valid JSON"),
        ('{"type": "Topology"}', "not GeoJSON"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[1, 2]]}}]', "invalid geometry"),
    ],
)
def test_broken_geojson_is_one_line(tmp_path, content, reason):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=reason) as info:
        read_geojson(path)
    assert "\n" not in str(info.value) and "bad.geojson" in str(info.value)


def test_self_intersecting_polygon_is_repaired_with_a_warning_or_refused(tmp_path):
    bowtie = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]},
        "properties": {"classification": {"name": "normal"}},
    }
    path = tmp_path / "bowtie.geojson"
    path.write_text(json.dumps([bowtie]))
    repaired = read_geojson(path)
    assert len(repaired) == 1 and repaired[0].area == pytest.approx(50) and "Self-intersection" in repaired.warnings[0]
    with pytest.raises(AnnotationError, match="feature 0: invalid polygon"):
        read_geojson(path, repair=False)


def test_writing_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "keep.geojson"
    path.write_text("precious")
    one = AnnotationSet([Annotation(box(0, 0, 5, 5), "normal")])
    with pytest.raises(AnnotationError, match="already exists"):
        write_geojson(one, path)
    assert path.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.geojson"]
    write_geojson(one, path, overwrite=True)
    assert len(read_geojson(path)) == 1


def test_malformed_coco_entry_is_one_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [], "categories": []}))
    with pytest.raises(AnnotationError, match="malformed COCO entry") as info:
        read_coco(path)
    assert "broken.json" in str(info.value) and "\n" not in str(info.value)


def _coco_with(annotation) -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}],
        "annotations": [annotation],
        "categories": [{"id": 1, "name": "glomerulus"}],
    }


@pytest.mark.parametrize(
    ("annotation", "reason"),
    [
        (1, "malformed COCO entry"),
        ({"image_id": 1, "category_id": 1, "segmentation": {"size": [4, 4], "counts": "P"}}, "truncated RLE"),
        ({"image_id": 1, "category_id": 1, "segmentation": {"size": [4, 4], "counts": [20, -4]}}, "non-negative"),
        ({"image_id": 1, "category_id": 1, "segmentation": {"size": [2, 2], "counts": [1, 3]}}, "not the image's"),
        ({"image_id": 1, "category_id": 1, "segmentation": [[0, 0, float("nan"), 1, 2, 2]]}, "not numbers"),
    ],
)
def test_broken_coco_annotations_are_one_line(tmp_path, annotation, reason):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(_coco_with(annotation)))
    with pytest.raises(AnnotationError, match=reason) as info:
        read_coco(path)
    assert "broken.json" in str(info.value) and "\n" not in str(info.value)
