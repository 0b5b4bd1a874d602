"""The public nuclei sets in ../shared/data/nuclei: what the shipped nuclei model trains on and is judged on.

Training side: MICCAI 2015 TCGA (15 images; 01-07 at 20x, 08-15 at 40x, as its
README says) and the MoNuSeg 2018 non-hidden set (22 images at 40x, pixel size in
each ImageScope XML). Evaluation side: NuInsSeg kidney (51 images, human and
mouse), never trained on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("NEPHRO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
NUCLEI = SHARED / "nuclei"
MICCAI = NUCLEI / "miccai2015_tcga"
MONUSEG = NUCLEI / "monuseg_nonhidden"
NUINSSEG = NUCLEI / "nuinsseg_kidney"
MICCAI_20X = {f"image{i:02d}" for i in range(1, 8)}  # the others are 40x (README_training.txt)
MPP_20X, MPP_40X = 0.5, 0.25
# NuInsSeg's files state no pixel size; the dataset says 40x, i.e. about 0.25 um/px
NUINSSEG_MPP = 0.25
TERMS = {
    "MICCAI 2015 TCGA": "MICCAI 2015 digital pathology segmentation challenge training set; terms not stated",
    "MoNuSeg 2018": "Kumar et al., IEEE TMI 2017 / 2020; CC BY-NC-SA 4.0",
}


def training_images(mpp: float, progress=None):
    """Every MICCAI 2015 and MoNuSeg image at `mpp`, each its own group (the split is by image)."""
    from napari_nephro.training.nuclei_data import nucleus_images

    out = []
    for labels in sorted(MICCAI.glob("image*_labels.tif")):
        name = labels.name.replace("_labels.tif", "")
        own = MPP_20X if name in MICCAI_20X else MPP_40X
        out += nucleus_images(labels, MICCAI / f"{name}.png", mpp=mpp, image_mpp=own, group=f"miccai:{name}")
    for part in ("train", "test"):
        images = nucleus_images(MONUSEG / part / "annotations", MONUSEG / part / "images", mpp=mpp, image_mpp=MPP_40X)
        for item in images:
            item.group = f"monuseg:{item.name}"
        out += images
        if progress:
            progress(len(out))
    return out


def kidney_images() -> list[tuple[str, str, Path, Path]]:
    """(name, species, image, instance labels) for every NuInsSeg kidney image, sorted."""
    out = []
    for image in sorted(NUINSSEG.glob("*/images/*.png")):
        labels = image.parents[1] / "inst_labels" / f"{image.stem}.tif"
        species = re.match(r"(human|mouse)", image.stem).group(1)
        out.append((image.stem, species, image, labels))
    return out


def read_kidney(image: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    import tifffile
    from PIL import Image

    return np.asarray(Image.open(image).convert("RGB")), tifffile.imread(labels).astype(np.int32)
