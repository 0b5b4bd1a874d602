"""What a run found, in one line, and a warning when that cannot be right.

A glomerulus model run on skin, or on a slide whose pixel size is wrong, still
paints pixels; the numbers give it away (a third of the tissue marked, objects
of half a square millimetre, thousands of specks). The summary is gathered as
objects are emitted, so a whole-slide run needs no second pass over its output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .objects import ObjectRules

BINS_PER_DECADE = 100  # the median comes from a log-spaced histogram of areas: within about 1 %
MAX_SHARE = 0.25  # of the tissue marked as the objects: no kidney section holds more glomeruli than this
MAX_OBJECTS = 1000  # on one slide
MAX_DENSITY_PER_MM2 = 50.0  # objects per mm² of tissue (glomeruli: a few to a few tens)
MOSTLY_SMALL = 0.9  # share of pieces below the minimum area that says the model sees noise
PLURALS = {"glomerulus": "glomeruli", "nucleus": "nuclei", "artery": "arteries", "tubule": "tubules"}


@dataclass
class ObjectSummary:
    """Objects per class and their areas; `small`: pieces below the minimum area (dropped when rules applied)."""

    classes: dict[int, str]
    mpp: float  # um per pixel of the label image
    counts: dict[int, int] = field(default_factory=dict)
    min_px: int | None = None
    max_px: int | None = None
    foreground_px: int = 0
    small: int = 0
    small_dropped: bool = False
    histogram: dict[int, int] = field(default_factory=dict)  # log10-area bin -> objects
    tissue_um2: float | None = None  # estimated from the run's tissue map; None when not known
    slide_mpp: float | None = None  # the slide's own pixel size, to name in a warning
    reference: ObjectRules | None = None  # what a plausible object is; None: no warnings

    def add(self, cls: int, areas_px: list[int], small: int = 0) -> None:
        """Count the pieces (pixel areas) of one object of class `cls`."""
        self.small += small
        if not areas_px:
            return
        self.counts[cls] = self.counts.get(cls, 0) + len(areas_px)
        self.foreground_px += sum(areas_px)
        low, high = min(areas_px), max(areas_px)
        self.min_px = low if self.min_px is None else min(self.min_px, low)
        self.max_px = high if self.max_px is None else max(self.max_px, high)
        for area in areas_px:
            b = math.floor(math.log10(area) * BINS_PER_DECADE)
            self.histogram[b] = self.histogram.get(b, 0) + 1

    def merge(self, other: ObjectSummary) -> None:
        for cls, n in other.counts.items():
            self.counts[cls] = self.counts.get(cls, 0) + n
        for b, n in other.histogram.items():
            self.histogram[b] = self.histogram.get(b, 0) + n
        self.foreground_px += other.foreground_px
        self.small += other.small
        for name, pick in (("min_px", min), ("max_px", max)):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, theirs if mine is None else mine if theirs is None else pick(mine, theirs))

    def to_state(self) -> dict:
        """The counts as JSON, to keep with a partial run (a resumed run adds to them)."""
        return {
            "counts": {str(k): v for k, v in self.counts.items()},
            "min_px": self.min_px,
            "max_px": self.max_px,
            "foreground_px": self.foreground_px,
            "small": self.small,
            "histogram": {str(k): v for k, v in self.histogram.items()},
        }

    def load_state(self, state: dict) -> None:
        self.counts = {int(k): int(v) for k, v in state["counts"].items()}
        self.histogram = {int(k): int(v) for k, v in state["histogram"].items()}
        self.min_px, self.max_px = state["min_px"], state["max_px"]
        self.foreground_px, self.small = int(state["foreground_px"]), int(state["small"])

    # -- numbers ------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return sum(self.counts.values())

    @property
    def min_um2(self) -> float | None:
        return None if self.min_px is None else self.min_px * self.mpp**2

    @property
    def max_um2(self) -> float | None:
        return None if self.max_px is None else self.max_px * self.mpp**2

    @property
    def median_um2(self) -> float | None:
        """From the histogram (bins 2.3 % wide), kept within the exact minimum and maximum."""
        if not self.count:
            return None
        half, seen = self.count / 2, 0
        for b in sorted(self.histogram):
            seen += self.histogram[b]
            if seen >= half:
                px = min(max(10 ** ((b + 0.5) / BINS_PER_DECADE), self.min_px), self.max_px)
                return px * self.mpp**2
        return self.max_um2

    @property
    def foreground_um2(self) -> float:
        return self.foreground_px * self.mpp**2

    @property
    def share(self) -> float | None:
        """Foreground per tissue, when the tissue is known."""
        return self.foreground_um2 / self.tissue_um2 if self.tissue_um2 else None

    # -- words --------------------------------------------------------------------------
    def describe(self) -> str:
        """'12 glomeruli found, 4,100 to 38,000 µm² (median 12,000)', 'no glomeruli found'."""
        named = [self.classes[k] for k in sorted(self.classes)]
        single = len(named) == 1
        what = _plural(named[0]) if single else "objects"
        n = self.count
        if not n:
            return f"no {what} found"
        if n == 1:
            return f"1 {named[0] if single else 'object'} found, {_area(self.min_um2)} µm²"
        text = f"{n:,} {what} found"
        if not single:
            each = (f"{self.counts[k]:,} {self.classes.get(k, f'class {k}')}" for k in sorted(self.counts))
            text += f" ({', '.join(each)})"
        return f"{text}, {_area(self.min_um2)} to {_area(self.max_um2)} µm² (median {_area(self.median_um2)})"

    def warning(self) -> str | None:
        """One line when the numbers are implausible for the objects the model is meant to find, else None."""
        ref = self.reference
        if ref is None:
            return None
        reasons = []
        what = " or ".join(self.classes[k] for k in sorted(self.classes))
        share = self.share
        if share is not None and share > MAX_SHARE:
            part = f"{share:.0%} of the tissue" if share < 1 else "more than the tissue's area"
            reasons.append(f"{part} is marked {what} (no kidney holds over {MAX_SHARE:.0%})")
        density = self.count / (self.tissue_um2 / 1e6) if self.tissue_um2 else None
        if self.count > MAX_OBJECTS or (density is not None and self.count >= 100 and density > MAX_DENSITY_PER_MM2):
            per = "" if density is None else f", {density:,.0f} per mm² of tissue"
            reasons.append(f"{self.count:,} objects{per}")
        if self.max_um2 is not None and self.max_um2 > ref.max_area_um2:
            reasons.append(f"an object of {_area(self.max_um2)} µm² (none is over {_area(ref.max_area_um2)})")
        pieces = self.small + (self.count if self.small_dropped else self.count - self.small)
        if self.small >= 20 and self.small > MOSTLY_SMALL * pieces:
            reasons.append(f"{self.small:,} of {pieces:,} pieces are under {_area(ref.min_area_um2)} µm²")
        if not reasons:
            return None
        mpp = self.slide_mpp or self.mpp
        return (
            f"this does not look like {_plural(self.classes[min(self.classes)]) if len(self.classes) == 1 else what}: "
            f"{'; '.join(reasons)}. Check the slide's pixel size ({mpp:g} µm/px), its stain, "
            "and that the model was trained on slides like it"
        )


def reference_for(classes: dict[int, str], rules: ObjectRules | None) -> ObjectRules | None:
    """What plausible objects are: the rules applied, else glomerulus sizes for a glomerulus model, else unknown."""
    if rules is not None:
        return rules
    return ObjectRules() if any("glomerul" in name.lower() for name in classes.values()) else None


def summarize(
    labels: np.ndarray,
    mpp: float,
    classes: dict[int, str],
    *,
    rules: ObjectRules | None = None,
    tissue_um2: float | None = None,
) -> ObjectSummary:
    """The summary of a class-id label image as it is: its connected pieces per class (4-connected, as exported).

    `rules`: those the labels were cleaned with (small pieces are then gone), else
    the reference for warnings is guessed from the class names (`reference_for`).
    """
    reference = reference_for(classes, rules)
    small_px = reference.min_area_um2 / mpp**2 if reference is not None else 0.0
    summary = ObjectSummary(classes, mpp, small_dropped=rules is not None, tissue_um2=tissue_um2, reference=reference)
    labels = np.asarray(labels)
    for cls in sorted(int(c) for c in np.unique(labels) if c):
        pieces, n = ndimage.label(labels == cls)
        areas = np.bincount(pieces.ravel(), minlength=n + 1)[1:]
        summary.add(cls, areas.tolist(), 0 if rules is not None else int(np.sum(areas < small_px)))
    return summary


def _plural(name: str) -> str:
    return PLURALS.get(name, f"{name} objects")


def _area(um2: float | None) -> str:
    """Two significant digits, with thousands separators: 4,100; 38,000; 0.52."""
    if um2 is None:
        return "?"
    if um2 >= 100:
        return f"{float(f'{um2:.2g}'):,.0f}"
    return f"{um2:.2g}"
