"""ImageScope / ASAP XML, OME-Zarr labels and label TIFFs: read, write, round trips, no partial files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from shapely.geometry import Point, Polygon, box

from conftest import require_shared
from napari_nephro.annotations import (
    Annotation,
    AnnotationError,
    AnnotationSet,
    ArrayLabels,
    PolygonLabels,
    rasterize,
    read_annotations,
    read_geojson,
    read_label_image,
    read_label_zarr,
    read_xml_annotations,
    vectorize,
    vectorize_tiled,
    write_geojson,
    write_imagescope_xml,
    write_label_tiff,
    write_label_zarr,
)

HUBMAP_SHAPE = (18484, 13013)  # height, width of the slide the HuBMAP GeoJSON belongs to


def hubmap() -> AnnotationSet:
    glomeruli = read_geojson(require_shared("annotations", "hubmap_aaa6a05cc_glomeruli.geojson"))
    anatomy = read_geojson(require_shared("annotations", "hubmap_aaa6a05cc_anatomical.geojson"))
    return AnnotationSet([*anatomy, *glomeruli])


def test_geojson_to_imagescope_xml_and_back_keeps_every_object_class_and_outline(tmp_path):
    original = hubmap()  # the cortex is a MultiPolygon: ImageScope splits it, our object attribute joins it again
    assert any(a.geometry.geom_type == "MultiPolygon" for a in original)
    out = write_imagescope_xml(original, tmp_path / "slide.xml", mpp=0.5)
    back = read_xml_annotations(out)
    assert back.counts() == {"Medulla": 1, "Cortex": 1, "glomerulus": 96} and back.warnings == []
    for a, b in zip(original, back, strict=True):
        assert a.label == b.label
        assert a.geometry.symmetric_difference(b.geometry).area < 1e-6 * a.area
    root = __import__("xml.etree.ElementTree").etree.ElementTree.parse(out).getroot()
    assert root.get("MicronsPerPixel") == "0.500000"
    assert [layer.get("Name") for layer in root.iter("Annotation")] == ["Medulla", "Cortex", "glomerulus"]


MONUSEG_STYLE = """<?xml version="1.0"?>
<Annotations MicronsPerPixel="0.252100">
  <Annotation Id="1" Name="" LineColor="65280" Type="4">
    <Attributes><Attribute Name="Description" Id="0" Value="nucleus"/></Attributes>
    <Regions>
      <Region Id="1" Type="0" NegativeROA="0">
        <Vertices><Vertex X="0" Y="0"/><Vertex X="100" Y="0"/><Vertex X="100" Y="100"/><Vertex X="0" Y="100"/></Vertices>
      </Region>
      <Region Id="2" Type="0" NegativeROA="1">
        <Vertices><Vertex X="40" Y="40"/><Vertex X="60" Y="40"/><Vertex X="60" Y="60"/><Vertex X="40" Y="60"/></Vertices>
      </Region>
      <Region Id="3" Type="2" NegativeROA="0">
        <Vertices><Vertex X="200" Y="200"/><Vertex X="260" Y="240"/></Vertices>
      </Region>
      <Region Id="4" Type="1" NegativeROA="0">
        <Vertices><Vertex X="300" Y="300"/><Vertex X="310" Y="300"/><Vertex X="310" Y="320"/><Vertex X="300" Y="320"/></Vertices>
      </Region>
      <Region Id="5" Type="3" NegativeROA="0">
        <Vertices><Vertex X="1" Y="1"/><Vertex X="50" Y="50"/></Vertices>
      </Region>
    </Regions>
  </Annotation>
  <Annotation Id="2" Name="glomerulus" Type="4">
    <Regions>
      <Region Id="1" Type="0"><Vertices><Vertex X="500" Y="500"/><Vertex X="520" Y="500"/><Vertex X="510" Y="530"/></Vertices></Region>
    </Regions>
  </Annotation>
</Annotations>
"""


def test_imagescope_xml_holes_ellipses_rectangles_and_layer_names(tmp_path):
    path = tmp_path / "TCGA-18-5592.xml"
    path.write_text(MONUSEG_STYLE)
    found = read_xml_annotations(path)
    assert found.counts() == {"nucleus": 3, "glomerulus": 1}
    square, ellipse, rectangle, triangle = found
    assert square.area == pytest.approx(100 * 100 - 20 * 20)  # the negative region is a hole
    assert ellipse.area == pytest.approx(np.pi * 30 * 20, rel=0.01)
    assert rectangle.bounds == (300, 300, 310, 320)
    assert triangle.label == "glomerulus"
    assert any("region type 3" in w for w in found.warnings)  # the arrow is said to be skipped, not drawn


def test_asap_xml_reads_groups_as_classes(tmp_path):
    path = tmp_path / "asap.xml"
    path.write_text(
        """<ASAP_Annotations><Annotations>
        <Annotation Name="A1" Type="Polygon" PartOfGroup="global sclerosis"><Coordinates>
          <Coordinate Order="2" X="10" Y="10"/><Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="10" Y="0"/>
        </Coordinates></Annotation>
        <Annotation Name="A2" Type="Dot" PartOfGroup="None"><Coordinates><Coordinate Order="0" X="5" Y="5"/></Coordinates></Annotation>
        </Annotations></ASAP_Annotations>"""
    )
    found = read_annotations(path)
    assert found.counts() == {"global sclerosis": 1} and found[0].area == pytest.approx(50)
    assert len(found.warnings) == 1


@pytest.mark.parametrize(
    ("content", "reason"),
    [("<Annotations><Annotation>", "not valid XML"), ("<svg/>", "not ImageScope or ASAP XML")],
)
def test_bad_xml_is_one_line(tmp_path, content, reason):
    path = tmp_path / "bad.xml"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=reason) as err:
        read_annotations(path)
    assert "\n" not in str(err.value)


def test_ome_zarr_labels_pyramid_matches_rasterizing_at_each_level(tmp_path):
    glomeruli = read_geojson(require_shared("annotations", "hubmap_aaa6a05cc_glomeruli.geojson"))
    out = write_label_zarr(PolygonLabels(glomeruli, HUBMAP_SHAPE), tmp_path / "glomeruli.zarr", mpp=0.5, chunk=2048)
    pyramid = read_label_zarr(out)
    assert pyramid.mpp == 0.5 and pyramid.downsamples[:3] == [1, 2, 4]
    assert pyramid.levels[0].shape == HUBMAP_SHAPE and pyramid.levels[-1].shape[0] <= 512
    assert pyramid.classes == dict.fromkeys(range(1, 97), "glomerulus")
    first = glomeruli[0]
    x0, y0 = (int(v) - 64 for v in first.bounds[:2])
    for level, d in enumerate(pyramid.downsamples[:4]):
        window = np.asarray(pyramid.levels[level][y0 // d : y0 // d + 300, x0 // d : x0 // d + 300])
        expected = rasterize(glomeruli, (300, 300), downsample=d, origin=(x0 // d * d, y0 // d * d), dtype=np.uint8)
        np.testing.assert_array_equal(window, expected)
        assert window[window > 0].min() == 1  # the first object keeps id 1 at every level
    # NGFF metadata other tools rely on
    attrs = json.loads((out / ".zattrs").read_text())
    assert attrs["multiscales"][0]["version"] == "0.4"
    assert attrs["multiscales"][0]["axes"][0]["unit"] == "micrometer"
    assert attrs["image-label"]["properties"][0] == {"label-value": 1, "class": "glomerulus"}


def test_ome_zarr_labels_read_back_as_the_same_objects(tmp_path):
    glomeruli = read_geojson(require_shared("annotations", "hubmap_aaa6a05cc_glomeruli.geojson"))
    out = write_label_zarr(PolygonLabels(glomeruli, HUBMAP_SHAPE), tmp_path / "g.zarr", chunk=4096)
    back = read_annotations(out)
    assert len(back) == 96 and back.counts() == {"glomerulus": 96}
    for a, b in zip(glomeruli, back, strict=True):
        iou = a.geometry.intersection(b.geometry).area / a.geometry.union(b.geometry).area
        assert iou > 0.98  # pixel outlines of the same polygon (less where a later glomerulus covers it)


def test_tiled_vectorize_equals_whole_vectorize_on_objects_across_tiles():
    rng = np.random.default_rng(3)
    labels = np.zeros((90, 110), np.uint32)
    for i in range(1, 40):  # overlapping discs and boxes, many crossing the 16-px tile borders
        y, x, r = rng.integers(0, 90), rng.integers(0, 110), rng.integers(2, 14)
        yy, xx = np.ogrid[:90, :110]
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = i
    whole = vectorize(labels)
    tiled = vectorize_tiled(labels, tile=16)
    assert len(tiled) == len(whole)
    for a, b in zip(whole, tiled, strict=True):
        assert a.properties["id"] == b.properties["id"] and a.geometry.equals(b.geometry)
    placed = vectorize_tiled(labels, tile=16, downsample=2, origin=(10, 20))  # a layer at half resolution, offset
    for a, b in zip(vectorize(labels, downsample=2, origin=(10, 20)), placed, strict=True):
        assert a.geometry.equals(b.geometry)


def test_label_tiff_keeps_ids_classes_pixel_size_and_a_pyramid(tmp_path):
    truth = read_label_image(require_shared("nuclei", "miccai2015_tcga", "image01_labels.tif"))
    out = write_label_tiff(ArrayLabels(truth), tmp_path / "ids.tif", mpp=0.25, tile=128, smallest=128)
    np.testing.assert_array_equal(read_label_image(out), truth)
    with tifffile.TiffFile(out) as tif:
        levels = tif.series[0].levels
        assert len(levels) >= 2 and levels[1].shape == tuple(-(-s // 2) for s in truth.shape)
        assert tif.pages[0].tags["XResolution"].value[0] == pytest.approx(1e4 / 0.25 * 1, rel=1e-6)
    annotations = AnnotationSet(
        [Annotation(box(2, 2, 30, 20), "normal"), Annotation(Point(60, 60).buffer(15), "global sclerosis")]
    )
    out = write_label_tiff(PolygonLabels(annotations, (100, 120)), tmp_path / "classes.tif")
    back = read_annotations(out)
    assert back.counts() == {"normal": 1, "global sclerosis": 1}


def test_interrupted_label_writes_leave_nothing_behind(tmp_path):
    class Failing(ArrayLabels):
        def tile(self, *args):
            raise KeyboardInterrupt

    source = Failing(np.ones((600, 600), np.uint8))
    for writer, name in ((write_label_zarr, "x.zarr"), (write_label_tiff, "x.tif")):
        with pytest.raises(KeyboardInterrupt):
            writer(source, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_label_writers_never_overwrite_unless_asked(tmp_path):
    source = ArrayLabels(np.eye(40, dtype=np.uint8))
    for writer, name in ((write_label_zarr, "x.zarr"), (write_label_tiff, "x.tif")):
        writer(source, tmp_path / name)
        with pytest.raises(AnnotationError, match="already exists"):
            writer(source, tmp_path / name)
        writer(ArrayLabels(np.eye(40, dtype=np.uint8) * 2), tmp_path / name, overwrite=True)
    assert read_label_zarr(tmp_path / "x.zarr").levels[0].max().compute() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tif", "x.zarr"]


def test_a_zarr_that_is_not_ome_is_one_line(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(AnnotationError, match="no 'multiscales'"):
        read_label_zarr(tmp_path / "plain.zarr")


def test_polygons_write_geojson_from_a_label_zarr_via_read_annotations(tmp_path):
    square = AnnotationSet([Annotation(Polygon([(10, 10), (50, 10), (50, 40), (10, 40)]), "normal")])
    zarr_path = write_label_zarr(PolygonLabels(square, (64, 64)), tmp_path / "s.zarr")
    write_geojson(read_annotations(zarr_path), tmp_path / "s.geojson")
    back = read_geojson(tmp_path / "s.geojson")
    assert back.counts() == {"normal": 1} and back[0].geometry.equals(square[0].geometry)
