"""A `PromptSet`: SegGPT's examples, all at one pixel size, saved as PNG pairs and a JSON index.

Every example is a square crop of `size` pixels at `mpp` micrometres per pixel
(the scale SegGPT will also see the slide at) and a mask of class ids over it:
0 is background, i is `classes[i - 1]`. A crop is cut around one object, its
`label`; other painted objects inside the crop keep their own classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..annotations.colors import class_color
from ..common.atomic import atomic_output
from ..common.json_io import read_json
from ..common.limits import mpp_problem, tile_problem
from .errors import PromptError

INDEX = "prompts.json"
VERSION = 1
SEGGPT_INPUT = 448  # SegGPT's input side: a crop of this many pixels is fed without resizing
DEFAULT_CLASSES = ("normal", "segmental sclerosis", "global sclerosis")


@dataclass
class Example:
    image: np.ndarray  # (size, size, 3) uint8 RGB
    mask: np.ndarray  # (size, size) uint8 class ids
    label: str  # the class of the object the crop is centred on
    source: str = ""  # the slide or image it was cut from (file name)
    location: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # crop box x, y, w, h in level-0 pixels
    id: str = ""

    def pixels_of(self, class_id: int) -> int:
        return int(np.count_nonzero(self.mask == class_id))


@dataclass
class PromptSet:
    classes: list[str] = field(default_factory=lambda: list(DEFAULT_CLASSES))
    mpp: float = 1.0  # micrometres per pixel of every crop
    size: int = SEGGPT_INPUT  # crop side in pixels at `mpp`
    examples: list[Example] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.classes = [str(c).strip() for c in self.classes]
        if not self.classes or len(set(self.classes)) != len(self.classes) or not all(self.classes):
            raise PromptError(f"classes must be distinct non-empty names, at least one, not {self.classes!r}")
        if len(self.classes) > 254:
            raise PromptError("a prompt set holds at most 254 classes")
        problem = mpp_problem(self.mpp, "prompt crops") or tile_problem(self.size, "crop")
        if problem:
            raise PromptError(problem)

    # -- contents --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.examples)

    @property
    def field_um(self) -> float:
        """The side of a crop in micrometres: the largest object an example can hold."""
        return self.size * self.mpp

    def class_id(self, label: str) -> int:
        if label not in self.classes:
            raise PromptError(f"class {label!r} is not in this prompt set ({', '.join(self.classes)})")
        return self.classes.index(label) + 1

    def of_class(self, label: str) -> list[Example]:
        return [e for e in self.examples if e.label == label]

    def counts(self) -> dict[str, int]:
        return {c: len(self.of_class(c)) for c in self.classes}

    def get(self, example_id: str) -> Example:
        for e in self.examples:
            if e.id == example_id:
                return e
        raise PromptError(f"no example {example_id!r} in this prompt set (it has {_ids(self.examples)})")

    def add(self, example: Example) -> Example | None:
        """Add `example` (a fresh id is given); an example already here (same source and crop) is skipped: None."""
        self._check(example)
        for e in self.examples:
            if e.source == example.source and np.allclose(e.location, example.location, atol=0.5):
                return None
        numbers = [int(e.id) for e in self.examples if e.id.isdigit()]
        example.id = f"{max(numbers, default=0) + 1:03d}"
        self.examples.append(example)
        return example

    def remove(self, *example_ids: str) -> None:
        for example_id in example_ids:
            self.get(example_id)
        self.examples = [e for e in self.examples if e.id not in example_ids]

    def relabel(self, example_id: str, label: str) -> None:
        """Give an example's object (the piece of its class nearest the crop's centre) another class;
        other objects in the crop keep theirs."""
        from scipy import ndimage

        example = self.get(example_id)
        old, new = self.class_id(example.label), self.class_id(label)
        pieces, count = ndimage.label(example.mask == old)
        if count:
            rows, cols = np.nonzero(pieces)
            centre = (example.mask.shape[0] - 1) / 2, (example.mask.shape[1] - 1) / 2
            nearest = np.argmin((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2)
            example.mask = np.where(pieces == pieces[rows[nearest], cols[nearest]], new, example.mask).astype(np.uint8)
        example.label = label

    def rename_class(self, old: str, new: str) -> None:
        """Rename a class (ids unchanged), e.g. a reader's 'Glomerulus' into 'normal'."""
        index = self.class_id(old) - 1
        if new in self.classes:
            raise PromptError(f"class {new!r} already exists")
        self.classes[index] = new
        for e in self.examples:
            if e.label == old:
                e.label = new

    def _check(self, example: Example) -> None:
        size = (self.size, self.size)
        if example.image.shape != (*size, 3) or example.image.dtype != np.uint8:
            raise PromptError(f"an example image must be {self.size}x{self.size} RGB uint8, not {example.image.shape}")
        if example.mask.shape != size:
            raise PromptError(f"an example mask must be {self.size}x{self.size}, not {example.mask.shape}")
        if int(example.mask.max(initial=0)) > len(self.classes):
            raise PromptError(
                f"an example mask holds class id {int(example.mask.max())}; the set has {len(self.classes)}"
            )
        if not example.pixels_of(self.class_id(example.label)):
            raise PromptError(
                f"the example of {example.label!r} from {example.source or 'an image'} has no {example.label!r} "
                "pixels in its mask: paint the object, or remove the example"
            )

    def check_usable(self) -> None:
        """Refuse a set SegGPT cannot work from: no examples at all."""
        if not self.examples:
            raise PromptError(
                "the prompt set is empty: paint a few objects (2 to 4 per class) and add them, "
                "or build one with `nephro prompts add`"
            )

    def fingerprint(self) -> str:
        """A short hash of everything SegGPT sees of the set: a resumed run checks it is unchanged."""
        digest = hashlib.sha256(json.dumps([self.classes, self.mpp, self.size]).encode())
        for e in self.examples:
            digest.update(e.label.encode())
            digest.update(np.ascontiguousarray(e.image).tobytes())
            digest.update(np.ascontiguousarray(e.mask).tobytes())
        return digest.hexdigest()[:16]

    # -- disk --------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the folder whole under a temporary name and rename it into place."""
        folder = Path(folder)
        is_set = (folder / INDEX).is_file()
        empty = folder.is_dir() and not any(folder.iterdir())
        if folder.exists() and not empty and not (overwrite and is_set):
            what = "a prompt set" if is_set else "something that is not a prompt set"
            hint = "; pass --overwrite to replace it" if is_set else ""
            raise PromptError(f"{folder}: already exists and holds {what}{hint}")
        if not folder.parent.is_dir():
            raise PromptError(f"{folder}: folder {folder.parent} does not exist")
        palette = _palette(self.classes)
        with atomic_output(folder) as tmp:
            (tmp / "examples").mkdir(parents=True)
            entries = []
            for e in self.examples:
                image, mask = f"examples/{e.id}.png", f"examples/{e.id}_mask.png"
                Image.fromarray(e.image).save(tmp / image)
                indexed = Image.fromarray(e.mask, mode="L").convert("P")
                indexed.putpalette(palette)
                indexed.save(tmp / mask)
                entries.append(
                    {
                        "id": e.id,
                        "class": e.label,
                        "image": image,
                        "mask": mask,
                        "source": e.source,
                        "location": [round(float(v), 3) for v in e.location],
                    }
                )
            index = {
                "version": VERSION,
                "model": "seggpt",
                "classes": self.classes,
                "mpp": self.mpp,
                "size": self.size,
                "examples": entries,
            }
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
            if is_set:  # the user's own files beside the set (notes, results) stay
                for other in folder.iterdir():
                    if other.name not in (INDEX, "examples"):
                        copy = shutil.copytree if other.is_dir() else shutil.copy2
                        copy(other, tmp / other.name)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> PromptSet:
        folder = Path(folder)
        index_path = folder / INDEX
        if not index_path.is_file():
            raise PromptError(f"{folder}: not a prompt set (no {INDEX}); make one with `nephro prompts add`")
        try:
            index = read_json(index_path, error=PromptError)
            version = int(index.get("version", VERSION))
            prompts = cls(list(index["classes"]), float(index["mpp"]), int(index["size"]))
            entries = list(index["examples"])
            if not all(isinstance(entry, dict) for entry in entries):
                raise TypeError("every example must be a JSON object")
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError) as exc:
            raise PromptError(f"{index_path}: not a valid prompt index ({exc.__class__.__name__}: {exc})") from None
        if version > VERSION:
            raise PromptError(f"{index_path}: written by a newer napari-nephro (version {version})")
        for entry in entries:
            try:
                image = np.asarray(Image.open(folder / entry["image"]).convert("RGB"))
                mask = np.asarray(Image.open(folder / entry["mask"]))
                example = Example(
                    image,
                    mask.astype(np.uint8),
                    str(entry["class"]),
                    str(entry.get("source", "")),
                    tuple(float(v) for v in entry.get("location", (0, 0, 0, 0))),
                    str(entry["id"]),
                )
            except (OSError, KeyError, TypeError, ValueError) as exc:
                raise PromptError(f"{folder}: example {entry.get('id', '?')} cannot be read ({exc})") from None
            if example.label not in prompts.classes:
                raise PromptError(
                    f"{folder}: example {example.id} has class {example.label!r}, not in the set's classes"
                )
            prompts._check(example)
            prompts.examples.append(example)
        return prompts

    def describe(self) -> str:
        counts = ", ".join(f"{c}: {n}" for c, n in self.counts().items())
        return f"{len(self)} examples ({counts}); {self.size} px crops at {self.mpp:g} um/px ({self.field_um:g} um)"


def _palette(classes: list[str]) -> list[int]:
    colours = [(0, 0, 0)] + [class_color(c) for c in classes]
    colours += [(0, 0, 0)] * (256 - len(colours))
    return [v for rgb in colours for v in rgb]


def _ids(examples: list[Example]) -> str:
    ids = [e.id for e in examples]
    return ", ".join(ids[:12]) + (" …" if len(ids) > 12 else "") if ids else "none"
