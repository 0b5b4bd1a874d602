"""One name for each nuclei model family, as the CLI and the widgets spell it: `family[:PATH]`.

`cellpose` (the classic nuclei net by default; `cellpose:cyto3`, `cellpose:cpsam` or a
model file), `stardist` (2D_versatile_he from StarDist's cache, or a model folder)
`cellvit:CHECKPOINT.pth`, and ours: `nuclei` (the model shipped in the package, offline
on a CPU) or `nuclei:FOLDER` (one trained with `nephro train --task nuclei`). Each family's module is imported only when it is
asked for, so neither TensorFlow nor cellpose is loaded by a glomerulus run.
"""

from __future__ import annotations

import importlib

from .errors import ModelError

FAMILIES = {
    "cellpose": ".cellpose_adapter",
    "stardist": ".stardist_adapter",
    "cellvit": ".cellvit",
    "nuclei": ".hover_segmenter",  # ours: the shipped model, or a folder from nephro train --task nuclei
}
# the options each family takes, as the CLI names them -> the adapter's keyword
OPTIONS = {
    "cellpose": {
        "diameter": "diameter",
        "flow_threshold": "flow_threshold",
        "cellprob_threshold": "cellprob_threshold",
    },
    "stardist": {"prob_threshold": "prob_thresh", "nms_threshold": "nms_thresh"},
    "cellvit": {},
    "nuclei": {"prob_threshold": "threshold"},
}


def family_of(spec: str) -> str | None:
    """'cellpose' for 'cellpose:cyto3', 'nuclei' for one of our nuclei checkpoint folders, None for a
    glomerulus checkpoint or 'default'."""
    name = str(spec).partition(":")[0].strip().lower()
    if name in FAMILIES:
        return name
    return "nuclei" if _is_hover_folder(spec) else None


def _is_hover_folder(spec: str) -> bool:
    """A checkpoint folder of ours whose network has HoVer heads (written by nephro train --task nuclei)."""
    import json
    from pathlib import Path

    try:
        data = json.loads((Path(spec) / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("heads") == "hover"


def load_nuclei_model(spec: str, *, device: str = "auto", **options):
    """The `InstanceSegmenter` named by `spec`; options left None take the model's defaults."""
    family = family_of(spec)
    if family is None:
        raise ModelError(f"{spec!r} is not a nuclei model: use {', '.join(f'{f}[:PATH]' for f in FAMILIES)}")
    given = {k: v for k, v in options.items() if v is not None}
    wrong = sorted(set(given) - set(OPTIONS[family]))
    if wrong:
        takes = ", ".join(f"--{k.replace('_', '-')}" for k in OPTIONS[family]) or "no options"
        names = ", ".join(f"--{k.replace('_', '-')}" for k in wrong)
        raise ModelError(f"{names}: not an option of {family} ({family} takes {takes})")
    named = str(spec).partition(":")[0].strip().lower() == family
    path = (str(spec).partition(":")[2] or None) if named else str(spec)
    module = importlib.import_module(FAMILIES[family], __package__)
    return module.load(path, device=device, **{OPTIONS[family][k]: v for k, v in given.items()})
