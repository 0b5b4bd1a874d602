"""`nephro export`: conversions between formats and training tile datasets, on the real annotated sets."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import random_levels, require_shared, write_pyramid
from napari_nephro.annotations import (
    Annotation,
    AnnotationSet,
    rasterize,
    read_annotations,
    read_coco,
    read_label_zarr,
    write_geojson,
)
from napari_nephro.cli import main
from napari_nephro.tiling import tile_grid

BUPT = ("glomeruli", "bupt_multistain_dev")


def _export(capsys, *args) -> list[str]:
    assert main(["export", *map(str, args)]) == 0, capsys.readouterr().err
    return capsys.readouterr().out.split()


def _fails(capsys, *args) -> str:
    assert main(["export", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_coco_with_many_images_becomes_one_geojson_per_image(tmp_path, capsys):
    coco = require_shared(*BUPT, "annotations.json")
    written = _export(capsys, coco, "--to", "geojson", "--out", tmp_path / "geojson")
    images = read_coco(coco)
    assert len(written) == len(images) == 42
    total = {}
    for path in written:
        for label, n in read_annotations(path).counts().items():
            total[label] = total.get(label, 0) + n
    expected = {}
    for image in images.values():
        for label, n in image.annotations.counts().items():
            expected[label] = expected.get(label, 0) + n
    assert {k: v for k, v in total.items() if v} == {k: v for k, v in expected.items() if v}
    assert sum(total.values()) == 66


def test_geojson_folder_back_to_coco_takes_image_sizes_from_the_images(tmp_path, capsys):
    coco = require_shared(*BUPT, "annotations.json")
    _export(capsys, coco, "--to", "geojson", "--out", tmp_path / "g")
    _export(
        capsys,
        tmp_path / "g",
        "--to",
        "coco",
        "--out",
        tmp_path / "back.json",
        "--slide",
        require_shared(*BUPT, "images"),
    )
    original, back = read_coco(coco), read_coco(tmp_path / "back.json")
    back = {f"images/{name}": image for name, image in back.items()}  # the BUPT file names its images images/...
    assert set(back) == set(original)
    for name, image in original.items():
        assert (back[name].height, back[name].width) == (image.height, image.width)
        assert len(back[name].annotations) == len(image.annotations)
        for a, b in zip(image.annotations, back[name].annotations, strict=True):
            assert a.label == b.label and a.geometry.symmetric_difference(b.geometry).area < 1


def test_vector_to_label_image_needs_the_slide_size(tmp_path, capsys):
    glomeruli = require_shared("annotations", "hubmap_aaa6a05cc_glomeruli.geojson")
    err = _fails(capsys, glomeruli, "--to", "zarr", "--out", tmp_path / "g.zarr")
    assert "give --slide" in err and not (tmp_path / "g.zarr").exists()


def test_tile_dataset_tiles_and_masks_line_up_with_the_image(tmp_path, capsys):
    images = require_shared(*BUPT, "images")
    coco = require_shared(*BUPT, "annotations.json")
    out = tmp_path / "tiles"
    _export(
        capsys,
        coco,
        "--to",
        "tiles",
        "--out",
        out,
        "--slide",
        images,
        "--tile",
        512,
        "--overlap",
        128,
        "--keep",
        "objects",
    )
    meta = json.loads((out / "dataset.json").read_text())
    classes = {int(k): v for k, v in meta["classes"].items()}
    with open(out / "tiles.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert meta["tiles"] == len(rows) > 42 and meta["tile_size"] == 512 and meta["overlap"] == 128
    annotations = {name.removeprefix("images/"): image for name, image in read_coco(coco).items()}
    for row in rows[::25]:
        image = np.asarray(Image.open(out / row["image"]))
        mask = np.asarray(Image.open(out / row["mask"]))
        assert image.shape == (512, 512, 3) and mask.shape == (512, 512) and mask.any()  # --keep objects
        x, y = int(float(row["x"])), int(float(row["y"]))
        source = np.asarray(Image.open(images / row["source"]).convert("RGB"))
        np.testing.assert_array_equal(image, source[y : y + 512, x : x + 512])
        truth = annotations[row["source"]].annotations
        expected = rasterize(
            AnnotationSet(truth.annotations, classes=list(classes.values())), (512, 512), origin=(x, y), values="class"
        )
        np.testing.assert_array_equal(mask, expected)
    # every annotated object is in at least one tile
    covered = {(r["source"]) for r in rows}
    assert covered == {name for name, im in annotations.items() if len(im.annotations)}


def test_tile_dataset_at_a_coarser_mpp_reads_the_matching_pyramid_level(tmp_path, capsys):
    levels = random_levels((600, 800), 3)
    slide = write_pyramid(tmp_path / "slide.ome.tif", levels, "ome", mpp=0.25)
    square = AnnotationSet([Annotation(__import__("shapely").box(100, 120, 300, 260), "normal")])
    write_geojson(square, tmp_path / "slide.geojson")
    out = tmp_path / "tiles"
    _export(
        capsys,
        tmp_path / "slide.geojson",
        "--to",
        "tiles",
        "--out",
        out,
        "--slide",
        slide,
        "--tile",
        128,
        "--overlap",
        0,
        "--mpp",
        0.5,
        "--keep",
        "all",
    )
    with open(out / "tiles.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(tile_grid((0, 0, 800, 600), tile=128, scale=2.0)) == 4 * 3
    for row in rows:
        x, y = float(row["x"]) / 2, float(row["y"]) / 2  # level 1 is the 0.5 um/px level
        tile = np.asarray(Image.open(out / row["image"]))
        np.testing.assert_array_equal(tile, levels[1][int(y) : int(y) + 128, int(x) : int(x) + 128])
        mask = np.asarray(Image.open(out / row["mask"]))
        ys, xs = np.nonzero(mask)
        if ys.size:  # the square is 100 x 70 px at 0.5 um/px, wherever the tile cuts it
            assert xs.min() + x >= 50 and xs.max() + x < 150 and ys.min() + y >= 60 and ys.max() + y < 130
    total = sum(np.count_nonzero(np.asarray(Image.open(out / r["mask"]))) for r in rows)
    assert total == 100 * 70  # tiles do not overlap here, so the square is counted once
    assert json.loads((out / "dataset.json").read_text())["mpp"] == 0.5


def test_label_masks_folder_to_tiles_matches_images_by_stem(tmp_path, capsys):
    masks = require_shared("glomeruli", "aidpath_pas", "masks")
    out = tmp_path / "aidpath"
    _export(
        capsys,
        masks,
        "--to",
        "tiles",
        "--out",
        out,
        "--slide",
        masks.parent / "images",
        "--tile",
        256,
        "--overlap",
        0,
        "--keep",
        "objects",
    )
    with open(out / "tiles.csv") as fh:
        sources = {r["source"] for r in csv.DictReader(fh)}
    assert len(sources) == 24
    assert json.loads((out / "dataset.json").read_text())["classes"] == {"1": "unclassified"}


def test_label_image_named_after_its_image_is_matched(tmp_path, capsys):
    folder = require_shared("nuclei", "miccai2015_tcga")
    written = _export(
        capsys, folder / "image01_labels.tif", "--to", "zarr", "--out", tmp_path / "n.zarr", "--slide", folder
    )
    pyramid = read_label_zarr(written[0])
    assert int(pyramid.levels[0].max().compute()) > 50  # instance ids kept, not binarised


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--to", "tiles"], "needs the images"),
        (["--to", "tiles", "--tile", "64", "--overlap", "64", "--slide", "SLIDES"], "overlap smaller than the tile"),
        (["--to", "geojson", "--slide", "SLIDE"], "one slide for 42 images"),
        (["--to", "geojson", "--slide", "NOWHERE"], "no such slide"),
    ],
)
def test_export_mistakes_are_one_line_and_write_nothing(tmp_path, capsys, extra, reason):
    coco = require_shared(*BUPT, "annotations.json")
    images = require_shared(*BUPT, "images")
    swap = {"SLIDES": images, "SLIDE": images / "20180002-PASM.jpg", "NOWHERE": tmp_path / "nowhere.svs"}
    extra = [str(swap.get(a, a)) for a in extra]
    err = _fails(capsys, coco, *extra, "--out", tmp_path / "out")
    assert reason in err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == []


def test_export_refuses_an_image_of_another_size(tmp_path, capsys):
    coco = require_shared(*BUPT, "annotations.json")
    image = next(iter(read_coco(coco).values()))
    wrong = tmp_path / f"{image.stem}.png"
    Image.new("RGB", (200, 100), "white").save(wrong)
    single = tmp_path / "one.json"
    single.write_text(json.dumps(_single_image_coco(coco, image.file_name)))
    err = _fails(capsys, single, "--to", "tiles", "--out", tmp_path / "t", "--slide", wrong)
    assert "are for a 1360x1024 image" in err and "200x100" in err


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    glomeruli = require_shared("annotations", "hubmap_aaa6a05cc_glomeruli.geojson")
    target = tmp_path / "g.xml"
    target.write_text("mine")
    assert "already exists" in _fails(capsys, glomeruli, "--to", "xml", "--out", target)
    assert target.read_text() == "mine"
    _export(capsys, glomeruli, "--to", "xml", "--out", target, "--overwrite")
    assert read_annotations(target).counts() == {"glomerulus": 96}


def _single_image_coco(coco, file_name):
    data = json.loads(coco.read_text())
    (image,) = [im for im in data["images"] if im["file_name"] == file_name]
    data["images"] = [image]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == image["id"]]
    return data


def test_polygons_outside_the_image_are_refused_in_export_and_evaluate(tmp_path, capsys):
    square = AnnotationSet([Annotation(__import__("shapely").box(5000, 5000, 5100, 5100), "normal")])
    write_geojson(square, tmp_path / "far.geojson")
    image = tmp_path / "far.png"
    Image.new("RGB", (300, 200), "white").save(image)
    err = _fails(capsys, tmp_path / "far.geojson", "--to", "tiff", "--out", tmp_path / "far.tif", "--slide", image)
    assert "1 of 1 objects lie outside the 300x200 image" in err and not (tmp_path / "far.tif").exists()
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "far.geojson"),
                "--truth",
                str(tmp_path / "far.geojson"),
                "--slide",
                str(image),
            ]
        )
        == 2
    )
    assert "outside the 300x200 image" in capsys.readouterr().err
