"""Saving Labels and Shapes layers through the plugin's writers, and opening label images, in napari."""

from __future__ import annotations

import numpy as np
import pytest
from napari.layers import Labels, Shapes

from conftest import require_shared
from napari_nephro.annotations import (
    ArrayLabels,
    read_annotations,
    read_coco,
    read_geojson,
    read_label_zarr,
    write_label_tiff,
)


def _slide_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open(str(require_shared("wsi", "CMU-1-Small-Region.svs")), plugin="napari-nephro")
    return viewer


def test_geojson_shapes_saved_back_keep_objects_classes_and_level0_coordinates(make_napari_viewer, tmp_path):
    viewer = _slide_viewer(make_napari_viewer)
    source = require_shared("annotations", "hubmap_aaa6a05cc_glomeruli.geojson")
    (layer,) = viewer.open(str(source), plugin="napari-nephro")
    for suffix in ("geojson", "xml"):
        out = tmp_path / f"saved.{suffix}"
        assert layer.save(str(out), plugin="napari-nephro") == [str(out)]
        back, original = read_annotations(out), read_geojson(source)
        assert back.counts() == {"glomerulus": 96}
        for a, b in zip(original, back, strict=True):  # still in level-0 pixels, not micrometres
            assert a.geometry.symmetric_difference(b.geometry).area < 1e-6 * a.area


def test_painted_labels_saved_as_geojson_coco_zarr_and_tiff(make_napari_viewer, tmp_path):
    viewer = _slide_viewer(make_napari_viewer)
    slide_layer = viewer.layers[0]
    h, w = slide_layer.data[0].shape[:2]
    painted = np.zeros((h // 2, w // 2), np.uint8)  # painted at half resolution: one pixel = 2 level-0 px
    painted[100:150, 200:260] = 1
    painted[300:320, 50:90] = 2
    layer = viewer.add_labels(
        painted,
        name="painted",
        scale=tuple(2 * s for s in slide_layer.scale),
        units=("um", "um"),
        metadata={"classes": {1: "normal", 2: "global sclerosis"}},
    )
    assert layer.save(str(tmp_path / "p.geojson"), plugin="napari-nephro")
    found = read_geojson(tmp_path / "p.geojson")
    assert found.counts() == {"normal": 1, "global sclerosis": 1}
    assert found[0].bounds == (400, 200, 520, 300)  # level-0 pixels of the slide
    assert layer.save(str(tmp_path / "p.json"), plugin="napari-nephro")
    (image,) = read_coco(tmp_path / "p.json").values()
    assert (image.height, image.width) == (h, w) and image.file_name == "CMU-1-Small-Region.svs"
    assert layer.save(str(tmp_path / "p.zarr"), plugin="napari-nephro")
    pyramid = read_label_zarr(tmp_path / "p.zarr")
    np.testing.assert_array_equal(pyramid.levels[0], painted)
    assert pyramid.classes == {1: "normal", 2: "global sclerosis"}
    assert pyramid.mpp == pytest.approx(2 * slide_layer.scale[-1])
    assert layer.save(str(tmp_path / "p.tif"), plugin="napari-nephro")
    assert read_annotations(tmp_path / "p.tif").counts() == {"normal": 1, "global sclerosis": 1}


def test_label_images_open_as_labels_layers_on_the_slide(make_napari_viewer, tmp_path):
    viewer = _slide_viewer(make_napari_viewer)
    labels = np.zeros((400, 500), np.uint16)
    labels[10:60, 10:90] = 5
    write_label_tiff(ArrayLabels(labels, {5: "normal"}), tmp_path / "l.tif", mpp=0.998, smallest=128)
    (layer,) = viewer.open(str(tmp_path / "l.tif"), plugin="napari-nephro")
    assert isinstance(layer, Labels) and layer.multiscale
    assert layer.metadata["classes"] == {5: "normal"}
    np.testing.assert_allclose(layer.scale, (0.998, 0.998))
    np.testing.assert_array_equal(np.asarray(layer.data[0]), labels)
    assert layer.save(str(tmp_path / "again.zarr"), plugin="napari-nephro")
    (again,) = viewer.open(str(tmp_path / "again.zarr"), plugin="napari-nephro")
    assert isinstance(again, Labels) and again.metadata["classes"] == {5: "normal"}
    np.testing.assert_array_equal(np.asarray(again.data), labels)  # 400 x 500 fits one level


def test_shapes_drawn_by_hand_save_as_polygons(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    layer = viewer.add_shapes(
        [np.array([[10, 10], [10, 50], [40, 50], [40, 10]]), np.array([[0, 0], [5, 5]])],
        shape_type=["rectangle", "line"],
        features={"class": ["segmental sclerosis", "x"]},
    )
    assert isinstance(layer, Shapes)
    assert layer.save(str(tmp_path / "s.geojson"), plugin="napari-nephro")
    found = read_geojson(tmp_path / "s.geojson")
    assert found.counts() == {"segmental sclerosis": 1} and found[0].bounds == (10, 10, 50, 40)


@pytest.mark.filterwarnings("ignore:Plugin .napari-nephro. tried to save layers")
def test_a_failed_save_is_one_notification_and_no_file(make_napari_viewer, tmp_path, notifications):
    viewer = make_napari_viewer()
    layer = viewer.add_shapes([np.array([[0, 0], [5, 5]])], shape_type="line")
    assert layer.save(str(tmp_path / "s.tif"), plugin="napari-nephro") == []
    assert len(notifications) == 1 and "not saved" in notifications[0]
    assert list(tmp_path.iterdir()) == []
