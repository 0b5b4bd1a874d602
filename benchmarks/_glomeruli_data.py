"""The annotated glomeruli in ../shared/data, split once by biopsy into training and held-out parts.

Shared by `train_default_model.py` (which never sees the held-out part) and
`eval_default_model.py` (which reports on it). The split is fixed here, by name,
so that every run and every reader sees the same one:

- AIDPATH PAS tiles: 6 of 24 held out. Four of them (10150, 10172, 10177, 10224:
  six glomeruli, chosen because their glomeruli are whole, not cut by the tile's
  edge) are the package's sample slide; 10003 and 10102 join them.
- BUPT multistain: 4 of the 12 trichrome / silver biopsies (8 images: normal,
  global sclerosis and other lesions) and 2 of the 3 PAS biopsies (7 images); the
  rest trains. A biopsy id is the file name's first field.

The BUPT images are microscope snapshots taken at several magnifications (the
PAS file names say 200x or 400x; glomeruli span 157 to 1,107 px). Their pixel size
is unknown, so each image's is estimated from its annotated glomeruli: their median
equivalent diameter is taken to be that of the AIDPATH tiles' whole glomeruli at
0.5 um/px (180 um). A user's slide states its pixel size; this stands in for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from napari_nephro.sample import sample_tile_names

DATA = Path(os.environ.get("NEPHRO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
AIDPATH = DATA / "glomeruli" / "aidpath_pas"
BUPT = DATA / "glomeruli" / "bupt_multistain_dev"
AIDPATH_MPP = 0.5  # 20x Aperio
GLOMERULUS_DIAMETER_UM = 180.0  # median equivalent diameter of the AIDPATH tiles' whole glomeruli
SAMPLE_TILES = tuple(sorted(sample_tile_names()))  # the package's sample slide: never trained on
HELD_OUT_AIDPATH = (*SAMPLE_TILES, "10003", "10102")
HELD_OUT_BIOPSIES = ("20180002", "20180022", "20181338", "20181352", "20181471", "20181472")
CLASS_GROUPS = {"gn": "normal", "gs": "global sclerosis", "gl": "other lesions", "gm": "other lesions"}


def biopsy(name: str) -> str:
    return Path(name).stem.split("-")[0]


def bupt_held_out(name: str) -> bool:
    return biopsy(name) in HELD_OUT_BIOPSIES


def bupt_mpp() -> dict[str, float]:
    """Image stem -> pixel size estimated from the median equivalent diameter of its glomeruli."""
    coco = json.loads((BUPT / "annotations.json").read_text())
    diameters: dict[int, list[float]] = {}
    for ann in coco["annotations"]:
        diameters.setdefault(ann["image_id"], []).append(2 * np.sqrt(ann["area"] / np.pi))
    return {
        Path(i["file_name"]).stem: round(GLOMERULUS_DIAMETER_UM / float(np.median(diameters[i["id"]])), 4)
        for i in coco["images"]
        if i["id"] in diameters
    }


def stain(name: str) -> str:
    for s in ("PASM", "PAS", "Masson"):
        if f"-{s}" in name:
            return s
    return "?"
