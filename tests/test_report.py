"""Per-biopsy reports: the numbers equal a hand count on a slide with known glomeruli, at any output scale."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import shapely
from scipy import ndimage

from conftest import require_shared
from napari_nephro.annotations import (
    Annotation,
    AnnotationSet,
    ArrayLabels,
    PolygonLabels,
    rasterize,
    write_geojson,
    write_label_tiff,
    write_label_zarr,
)
from napari_nephro.annotations.colors import class_color
from napari_nephro.annotations.omezarr import RUN_KEY, read_label_zarr
from napari_nephro.io import open_slide
from napari_nephro.report import (
    COLUMNS,
    BiopsyReport,
    ReportError,
    biopsy_report,
    write_biopsy_html,
    write_cohort,
)
from napari_nephro.report.measure import label_objects
from napari_nephro.sample import SAMPLE_MPP, sample_annotations, sample_slide_path

CLASSES = ["normal", "segmental sclerosis", "global sclerosis"]
# the class each of the sample's six annotated glomeruli is given here, in file order
GIVEN = ["normal", "global sclerosis", "normal", "segmental sclerosis", "global sclerosis", "normal"]
CSV_COLUMNS = ["id", "class", "score", "x_um", "y_um", "area_um2", "x_px", "y_px"]


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """The sample slide, its glomeruli with known classes, the same written as outputs at three scales
    (full resolution, 3x and 4x coarser), as GeoJSON, and a nuclei table with known places."""
    folder = tmp_path_factory.mktemp("known")
    slide = sample_slide_path()
    shape = open_slide(slide).level_shapes[0]
    glomeruli = AnnotationSet(
        [Annotation(a.geometry, c) for a, c in zip(sample_annotations(), GIVEN, strict=True)], classes=CLASSES
    )
    ids = {glomeruli.class_id(c): c for c in CLASSES}
    outputs = {"full": write_label_tiff(PolygonLabels(glomeruli, shape, "class"), folder / "full.tif", mpp=SAMPLE_MPP)}
    for d, name in ((3, "coarse3.tif"), (4, "coarse4.zarr")):
        raster = rasterize(
            glomeruli, (-(-shape[0] // d), -(-shape[1] // d)), downsample=d, values="class", dtype=np.uint8
        )
        writer = write_label_zarr if name.endswith(".zarr") else write_label_tiff
        outputs[name] = writer(ArrayLabels(raster, ids), folder / name, mpp=SAMPLE_MPP * d)
    _record(outputs["coarse4.zarr"], run_record(slide, shape, 4, model="abc123"))
    outputs["geojson"] = write_geojson(glomeruli, folder / "glomeruli.geojson")
    # nuclei: random places at least 10 µm from any glomerulus outline (no scale can misplace them)
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, shape[0], (1500, 2))
    outline = shapely.union_all([a.geometry.boundary for a in glomeruli])
    far = shapely.distance(shapely.points(xy), outline) * SAMPLE_MPP > 10
    xy = xy[far][:600]
    inside = shapely.contains_xy(shapely.union_all([a.geometry for a in glomeruli]), xy[:, 0], xy[:, 1])
    nuclei = folder / "nuclei.csv"
    write_nuclei_csv(nuclei, xy)
    return {"slide": slide, "glomeruli": glomeruli, "outputs": outputs, "nuclei": nuclei, "xy": xy, "inside": inside}


def write_nuclei_csv(path: Path, xy: np.ndarray) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for i, (x, y) in enumerate(xy, start=1):
            writer.writerow([i, "nucleus", 0.9, x * SAMPLE_MPP, y * SAMPLE_MPP, 30.0, x, y])
    return path


def run_record(slide, shape, out_downsample: float, *, model: str = "abc123", mpp: float = SAMPLE_MPP) -> dict:
    """What `nephro segment` records with its output (inference/api.py), for a finished run."""
    return {
        "slide": Path(slide).name,
        "slide_shape": list(shape),
        "slide_mpp": mpp,
        "model": model,
        "plan": {"region": [0, 0, shape[1], shape[0]], "scale": out_downsample, "out_downsample": out_downsample},
        "complete": True,
    }


def _record(store: Path, record: dict) -> None:
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    group.attrs[RUN_KEY] = record


def test_objects_found_block_by_block_are_those_of_one_labelling():
    rng = np.random.default_rng(0)
    image = (ndimage.gaussian_filter(rng.random((70, 53)), 1.5) > 0.52) * rng.integers(1, 4, (70, 53))
    points = rng.uniform(-2, 72, (300, 2))
    truth, n = pieces_of_each_class(image)
    whole = label_objects(image, points)
    for block in (4, 7, 16):  # objects cut by many block edges
        found = label_objects(image, points, block=block)
        assert len(found.areas_px) == n > 20
        assert sorted(found.areas_px) == sorted(np.bincount(truth.ravel())[1:])
        np.testing.assert_array_equal(found.hits, whole.hits)
        np.testing.assert_array_equal(
            found.values[found.hits[found.hits >= 0]], whole.values[whole.hits[whole.hits >= 0]]
        )
        np.testing.assert_array_equal(found.areas_px, whole.areas_px)  # the same order, whatever the blocks
    col, row = np.floor(points).astype(int).T
    on = (col >= 0) & (col < 53) & (row >= 0) & (row < 70)
    assert ((whole.hits >= 0) == on & (truth[row.clip(0, 69), col.clip(0, 52)] > 0)).all()
    for k in range(1, n + 1):  # each object's class: the one all its pixels have, its area theirs
        hit = whole.hits[on & (truth[row.clip(0, 69), col.clip(0, 52)] == k)]
        if hit.size:
            (value,) = np.unique(image[truth == k])
            assert whole.values[hit[0]] == value and whole.areas_px[hit[0]] == (truth == k).sum()


def pieces_of_each_class(image: np.ndarray) -> tuple[np.ndarray, int]:
    """The 4-connected pieces of each class, numbered one after another: the objects the project counts."""
    out, n = np.zeros(image.shape, np.int64), 0
    for value in np.unique(image[image > 0]):
        pieces, k = ndimage.label(image == value)
        out[pieces > 0] = pieces[pieces > 0] + n
        n += k
    return out, n


def test_touching_glomeruli_of_two_classes_count_as_the_export_and_the_run_count_them(known, tmp_path):
    """A label output, its own GeoJSON (as `nephro segment` exports it) and the run's summary give the same numbers."""
    from napari_nephro.inference.output import class_objects
    from napari_nephro.inference.summary import summarize

    d, shape = 4, open_slide(known["slide"]).level_shapes[0]
    yy, xx = np.mgrid[: shape[0] // d, : shape[1] // d]
    labels = np.zeros(yy.shape, np.uint8)
    labels[(yy - 100) ** 2 + (xx - 100) ** 2 < 40**2] = 1
    labels[(yy - 100) ** 2 + (xx - 170) ** 2 < 40**2] = 3  # a global sclerosis pressed against a normal one
    labels[(yy - 300) ** 2 + (xx - 300) ** 2 < 30**2] = 2
    labels[(yy - 300) ** 2 + (xx - 300) ** 2 < 8**2] = 1  # a normal island in a segmental one
    labels[400:420, 50:70] = labels[420:440, 70:90] = 1  # two of one class meeting at a corner: two
    ids = {1: "normal", 2: "segmental sclerosis", 3: "global sclerosis"}
    mpp = SAMPLE_MPP * d
    outputs = {
        "zarr": write_label_zarr(ArrayLabels(labels, ids), tmp_path / "g.zarr", mpp=mpp),
        "tif": write_label_tiff(ArrayLabels(labels, ids), tmp_path / "g.tif", mpp=mpp),
        "geojson": write_geojson(class_objects(labels, ids, downsample=d), tmp_path / "g.geojson"),
    }
    nuclei = write_nuclei_csv(tmp_path / "n.csv", np.random.default_rng(1).uniform(0, shape[0], (3000, 2)))
    rows = {k: biopsy_report(known["slide"], v, nuclei).row() for k, v in outputs.items()}
    summary = summarize(labels, mpp, ids)
    expected = {ids[k]: n for k, n in summary.counts.items()}
    assert expected == {"normal": 4, "segmental sclerosis": 1, "global sclerosis": 1}
    truth, n = pieces_of_each_class(labels)
    areas = np.bincount(truth.ravel())[1:] * mpp**2
    for name, row in rows.items():
        by_class = {c: int(k) for c, k in (part.split(": ") for part in row["glomeruli_by_class"].split("; "))}
        assert by_class == expected and row["glomeruli"] == summary.count == n, name
        assert (row["globally_sclerosed"], row["segmentally_sclerosed"]) == (1, 1)
        assert row["glomerular_area_min_um2"] == pytest.approx(summary.min_um2, abs=0.1)
        assert row["glomerular_area_max_um2"] == pytest.approx(summary.max_um2, abs=0.1)
        assert row["glomerular_area_total_um2"] == pytest.approx(areas.sum(), abs=0.1)
        assert row["glomerular_area_median_um2"] == pytest.approx(np.median(areas), abs=0.1)
    inside = labels[(nuclei_xy := _csv_xy(nuclei))[:, 1].astype(int) // d, nuclei_xy[:, 0].astype(int) // d] > 0
    assert rows["zarr"]["nuclei_in_glomeruli"] == int(inside.sum()) > 50
    same = [c for c in COLUMNS if c != "glomeruli_mpp"]  # polygons are exact, not measured at a pixel size
    assert {c: rows["zarr"][c] for c in same} == {c: rows["geojson"][c] for c in same}
    assert rows["zarr"] == rows["tif"]


def _csv_xy(path: Path) -> np.ndarray:
    with open(path, newline="") as f:
        return np.array([(float(r["x_px"]), float(r["y_px"])) for r in csv.DictReader(f)])


def test_report_equals_a_hand_count_at_every_output_scale(known):
    polygons = list(known["glomeruli"])
    expected_areas = sorted(a.geometry.area * SAMPLE_MPP**2 for a in polygons)
    by_area = sorted(polygons, key=lambda a: a.geometry.area)
    perimeters = [(a.geometry.area * SAMPLE_MPP**2, a.geometry.length * SAMPLE_MPP) for a in by_area]
    inside = int(known["inside"].sum())
    rows = {}
    for name, output in known["outputs"].items():
        report = biopsy_report(known["slide"], output, known["nuclei"])
        rows[name] = report.row()
        assert list(rows[name]) == list(COLUMNS)
        assert report.error is None and report.slide == Path(known["slide"]).name
        assert report.glomeruli == 6
        by_class = dict(part.split(": ") for part in report.glomeruli_by_class.split("; "))
        assert by_class == {"normal": "3", "segmental sclerosis": "1", "global sclerosis": "2"}
        if name != "geojson":  # a label image's classes come in the model's order (GeoJSON: as they appear)
            assert report.glomeruli_by_class == "normal: 3; segmental sclerosis: 1; global sclerosis: 2"
        assert (report.globally_sclerosed, report.segmentally_sclerosed) == (2, 1)
        assert report.global_sclerosis_pct == pytest.approx(100 * 2 / 6, abs=0.01)
        assert sorted(report.glomerulus_classes) == sorted(GIVEN)
        pixel_um = report.glomeruli_mpp or 0.0  # the GeoJSON's polygons are exact
        for area, (polygon_area, perimeter) in zip(sorted(report.glomerulus_areas_um2), perimeters, strict=True):
            assert abs(area - polygon_area) <= perimeter * pixel_um / 2 + 0.1, name  # half a pixel along the outline
        assert report.glomerular_area_median_um2 == pytest.approx(np.median(expected_areas), rel=0.03)
        assert report.nuclei == len(known["xy"]) == 600
        assert (report.nuclei_in_glomeruli, report.nuclei_outside_glomeruli) == (inside, 600 - inside)
        assert 10 < inside < 100
        glom_mm2 = report.glomerular_area_total_um2 / 1e6
        assert report.nuclei_in_glomeruli_per_mm2 == pytest.approx(inside / glom_mm2, rel=1e-3)
        assert report.nuclei_outside_glomeruli_per_mm2 == pytest.approx(
            (600 - inside) / (report.tissue_mm2 - glom_mm2), rel=1e-3
        )
    assert rows["coarse4.zarr"]["glomeruli_mpp"] == 2.0 and rows["coarse4.zarr"]["models"] == "glomeruli: abc123"
    counted = [
        c for c in COLUMNS if c.startswith(("glomeruli", "globally", "segmentally", "global", "nuclei", "tissue"))
    ]
    counted = [c for c in counted if not c.endswith(("_mpp", "_per_mm2", "_by_class"))]  # by class: checked above
    for name in rows:  # the same counts whatever the scale of the output
        assert {c: rows[name][c] for c in counted} == {c: rows["full"][c] for c in counted}, name
    again = biopsy_report(known["slide"], known["outputs"]["coarse3.tif"], known["nuclei"])
    assert again.row() == rows["coarse3.tif"]  # equal runs, equal rows
    # and each glomerulus is its pixels, ordered by its box's top-left corner: counted here without the report
    shape = open_slide(known["slide"]).level_shapes[0]
    raster = rasterize(
        known["glomeruli"], (-(-shape[0] // 3), -(-shape[1] // 3)), downsample=3, values="class", dtype=np.uint8
    )
    truth, n = pieces_of_each_class(raster)
    corners = [(box[0].start, box[1].start) for box in ndimage.find_objects(truth)]
    order = sorted(range(n), key=lambda k: corners[k])
    sizes = np.bincount(truth.ravel())[1:]
    assert again.glomerulus_areas_um2 == [round(float(sizes[k]) * (3 * SAMPLE_MPP) ** 2, 1) for k in order]
    names = {known["glomeruli"].class_id(c): c for c in CLASSES}
    assert again.glomerulus_classes == [names[int(raster[truth == k + 1][0])] for k in order]


def test_nuclei_are_read_alike_from_every_table_a_run_writes(known, tmp_path):
    import shutil

    from napari_nephro.inference.instance_output import TABLE
    from napari_nephro.report import read_nuclei

    shape = open_slide(known["slide"]).level_shapes[0]
    store = write_label_zarr(ArrayLabels(np.zeros((shape[0] // 4, shape[1] // 4), np.uint32)), tmp_path / "n.zarr")
    shutil.copy(known["nuclei"], store / TABLE)
    _record(store, run_record(known["slide"], shape, 4, model="nuc123"))
    for path, run in ((known["nuclei"], None), (store, "nuc123")):  # (Parquet: pyarrow is not installed here)
        xy, record = read_nuclei(path)
        np.testing.assert_allclose(xy, known["xy"], atol=0.01)  # the table's 2 decimals
        assert (record or {}).get("model") == run
    assert biopsy_report(known["slide"], nuclei=store).models == "nuclei: nuc123"
    (tmp_path / "no_y.csv").write_text("id,x_px\n1,2.0\n")
    with pytest.raises(ReportError, match=r"not a nuclei table of napari-nephro \(no column 'y_px'\)"):
        read_nuclei(tmp_path / "no_y.csv")


def test_tissue_area_matches_an_independent_estimate_and_a_blank_output_has_no_glomeruli(known, tmp_path):
    cmu = require_shared("wsi", "CMU-1-Small-Region.svs")
    for path in (known["slide"], cmu):
        slide = open_slide(path)
        estimate = _glass_free_area_mm2(slide)
        report = biopsy_report(slide)
        assert report.glomeruli is None and report.nuclei is None  # no outputs: no such numbers
        assert report.tissue_mm2 == pytest.approx(estimate, rel=0.06), path
        assert 0.3 < report.tissue_mm2 / (np.prod(slide.level_shapes[0]) * slide.mpp**2 / 1e6) < 0.95
    shape = open_slide(known["slide"]).level_shapes[0]
    blank = np.zeros((shape[0] // 4, shape[1] // 4), np.uint8)
    out = write_label_tiff(ArrayLabels(blank, {1: "glomerulus"}), tmp_path / "blank.tif", mpp=SAMPLE_MPP * 4)
    report = biopsy_report(known["slide"], out, known["nuclei"])
    assert report.glomeruli == 0 and report.glomerular_area_total_um2 == 0
    assert report.glomerular_area_mean_um2 is None and report.global_sclerosis_pct is None
    assert report.globally_sclerosed is None  # a model without sclerosis classes
    assert (report.nuclei_in_glomeruli, report.nuclei_outside_glomeruli) == (0, 600)
    assert report.nuclei_in_glomeruli_per_mm2 is None  # no glomerular area to divide by


def _glass_free_area_mm2(slide) -> float:
    """Another estimate: at 8 µm/px, pixels that are not bright, grey glass, with enclosed glass counted in."""
    from skimage.color import rgb2gray, rgb2hsv
    from skimage.transform import downscale_local_mean

    k = round(8 / slide.mpp)
    small = downscale_local_mean(np.asarray(slide.levels[0]) / 255, (k, k, 1))
    glass = (rgb2gray(small) > 0.85) & (rgb2hsv(small)[..., 1] < 0.08)
    return float(ndimage.binary_fill_holes(~glass).sum()) * (k * slide.mpp) ** 2 / 1e6


def test_outputs_of_another_slide_and_unknown_pixel_sizes_are_refused(known, tmp_path):
    cmu = require_shared("wsi", "CMU-1-Small-Region.svs")
    with pytest.raises(ReportError, match="not this slide's output"):
        biopsy_report(cmu, known["outputs"]["full"])
    other = tmp_path / "other.zarr"
    shape = open_slide(known["slide"]).level_shapes[0]
    write_label_zarr(ArrayLabels(np.zeros((shape[0] // 4, shape[1] // 4), np.uint8)), other, mpp=2.0)
    _record(other, run_record("other.svs", [100, 200], 4))
    with pytest.raises(ReportError, match=r"made from a slide of 200x100 px"):
        biopsy_report(known["slide"], other)
    tif = write_label_tiff(  # a TIFF keeps its run's record: no pixel size needed, another slide refused
        ArrayLabels(np.zeros((shape[0] // 4, shape[1] // 4), np.uint8)),
        tmp_path / "other.tif",
        run=run_record("other.svs", [100, 200], 4),
    )
    with pytest.raises(ReportError, match=r"made from a slide of 200x100 px"):
        biopsy_report(known["slide"], tif)
    far = write_nuclei_csv(tmp_path / "far.csv", np.array([[10.0, 10.0], [5000.0, 20.0]]))
    with pytest.raises(ReportError, match="not this slide's nuclei"):
        biopsy_report(known["slide"], nuclei=far)
    other_table = tmp_path / "other.csv"
    other_table.write_text("a,b\n1,2\n")
    with pytest.raises(ReportError, match="not a nuclei table of napari-nephro"):
        biopsy_report(known["slide"], nuclei=other_table)
    tcga = require_shared("wsi", "tcga-cr-7395-01a-01-ts1.svs")  # a file without a pixel size
    with pytest.raises(ReportError, match=r"pixel size is unknown; give it \(mpp="):
        biopsy_report(tcga)
    assert biopsy_report(tcga, mpp=0.25).tissue_mm2 > 0.3
    with pytest.raises(ReportError) as caught:
        biopsy_report(tmp_path / "missing.svs")
    assert "\n" not in str(caught.value) and "missing.svs" in str(caught.value)


def test_page_and_cohort_show_every_slide_and_a_failed_one_in_red(known, tmp_path):
    reports = {}
    pages = {}
    for name in ("full", "coarse4.zarr"):
        report = biopsy_report(known["slide"], known["outputs"][name], known["nuclei"])
        report.slide = f"{name}-{report.slide}"  # two rows of one slide, told apart
        page = write_biopsy_html(
            report, tmp_path / f"{name}.html", slide=known["slide"], glomeruli=known["outputs"][name]
        )
        text = page.read_text()
        assert report.slide in text and "Globally sclerosed (%)" in text and "33.33" in text
        overview = _images(text)[0]
        for c in CLASSES:  # the outlines, in each class's colour
            assert (overview == class_color(c)).all(axis=-1).sum() > 100, (name, c)
        reports[report.slide], pages[report.slide] = report, str(page)
    failed = BiopsyReport.failed("broken.svs", "broken.svs: not a slide\n(truncated file)")
    assert failed.row()["error"] == "broken.svs: not a slide (truncated file)"
    assert [k for k, v in failed.row().items() if v is not None] == ["slide", "error"]
    table, index = write_cohort([*reports.values(), failed], tmp_path / "cohort", pages=pages)
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["slide"] for r in rows] == [*reports, "broken.svs"]
    assert list(rows[0]) == list(COLUMNS)
    assert rows[0]["glomeruli"] == "6" and rows[2]["error"] == "broken.svs: not a slide (truncated file)"
    assert rows[2]["glomeruli"] == "" and rows[0]["error"] == ""
    html = index.read_text()
    for name in reports:
        assert f'<a href="../{Path(pages[name]).name}">{name}</a>' in html
    assert re.search(r"<tr class=failed><td>broken.svs</td>.*not a slide \(truncated file\)", html)
    assert "3 slides, 2 reported, 1 failed" in html and "<td>total</td><td></td><td>" in html


def test_the_page_is_drawn_from_what_the_report_kept(known, tmp_path, monkeypatch):
    """In a cohort the page reads neither the output nor the slide again (a whole slide each time)."""
    from napari_nephro.report import page

    shape = open_slide(known["slide"]).level_shapes[0]
    coarse = read_label_zarr(known["outputs"]["coarse4.zarr"])
    tif = write_label_tiff(  # as a run at the working scale writes it: the record, no pixel size
        ArrayLabels(np.asarray(coarse.levels[0]), coarse.classes),
        tmp_path / "run.tif",
        run=run_record(known["slide"], shape, 4, model="tif123"),
    )
    report = biopsy_report(known["slide"], tif)
    assert report.glomeruli == 6 and report.models == "glomeruli: tif123" and report.glomeruli_mpp == 2.0

    def again(*_, **__):
        raise AssertionError("read again")

    monkeypatch.setattr(page, "read_glomeruli", again)
    monkeypatch.setattr(page, "read_scaled", again)
    monkeypatch.setattr(page, "OVERVIEW_SIDE", 256)  # no finer than the tissue thumbnail (8 µm/px here): it is used
    out = write_biopsy_html(report, tmp_path / "page.html", slide=known["slide"])
    overview = _images(out.read_text())[0]
    assert overview.shape[:2] == report.tissue.rgb.shape[:2] == (256, 256)
    outlined = np.zeros(overview.shape[:2], bool)
    for c in CLASSES:
        outlined |= (overview == class_color(c)).all(axis=-1)
    assert 100 < outlined.sum() < 0.1 * outlined.size
    np.testing.assert_array_equal(overview[~outlined], report.tissue.rgb[~outlined])


def _images(text: str) -> list[np.ndarray]:
    import base64
    import io

    from PIL import Image

    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"))
        for b in re.findall(r"base64,([^\"]+)", text)
    ]


def test_a_failed_write_leaves_nothing_behind(known, tmp_path):
    report = biopsy_report(known["slide"], known["outputs"]["full"])
    blocker = tmp_path / "cohort"
    blocker.write_text("a file")
    with pytest.raises(ReportError, match="is a file; give a folder") as caught:
        write_cohort([report], blocker)
    assert "\n" not in str(caught.value)
    with pytest.raises(ReportError, match="does not exist"):
        write_biopsy_html(report, tmp_path / "nowhere" / "page.html", slide=known["slide"])
    with pytest.raises(ReportError, match="is a folder"):
        write_biopsy_html(report, tmp_path, slide=known["slide"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"] and blocker.read_text() == "a file"
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "cohort.csv").mkdir()  # a folder where the table goes: refused, neither file written
    with pytest.raises(ReportError, match="is a folder"):
        write_cohort([report], tmp_path / "ok")
    assert [p.name for p in (tmp_path / "ok").iterdir()] == ["cohort.csv"]
