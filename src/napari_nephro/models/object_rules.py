"""How a model's pixel map becomes objects: the `objects` rules of a checkpoint's config.json.

Plain values and their checks, with no numpy: a config is read (and checked) far
more often than a slide is segmented. The cleaning itself is `inference.objects`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import ModelError

LIMITS = {"smooth_um": 50.0, "split_min_um": 1000.0}  # beyond these a rule is a typo, and would cost GiB


@dataclass(frozen=True)
class ObjectRules:
    """How a model's pixel map becomes objects; stored as `objects` in a checkpoint's config.json."""

    fill_holes: bool = True  # holes fully enclosed by an object, of any size, are part of it
    min_area_um2: float = 2000.0  # a glomerulus cut anywhere is larger (about 50 um across): smaller pieces are noise
    split_touching: bool = True  # two glomeruli that touch are two objects, a 1-px line apart
    split_min_um: float = 40.0  # cores of one object closer than this are never split (a glomerulus is ~180 um)
    smooth_um: float = 2.0  # outline detail finer than this is smoothed away (Gaussian, re-thresholded)
    max_area_um2: float = 250_000.0  # no glomerulus is larger: objects beyond it make the summary warn

    @classmethod
    def from_config(cls, value: dict | None) -> ObjectRules | None:
        """The rules of a config's `objects` entry (None: the model's pixel map is used as it is)."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ModelError(f"objects must be a JSON object of rules, not {_short(value)}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ModelError(f"objects: unknown rules {', '.join(unknown)} (known: {', '.join(known)})")
        checked = {}
        for name, item in value.items():
            if known[name].type == "bool":
                if not isinstance(item, bool):
                    raise ModelError(f"objects: {name} must be true or false, not {_short(item)}")
                checked[name] = item
                continue
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item) or item < 0:
                raise ModelError(f"objects: {name} must be a finite number of at least 0, not {_short(item)}")
            if item > LIMITS.get(name, math.inf):
                raise ModelError(f"objects: {name} must be at most {LIMITS[name]:g}, not {item:g}")
            checked[name] = float(item)
        rules = cls(**checked)
        if rules.min_area_um2 > rules.max_area_um2:
            raise ModelError(
                f"objects: min_area_um2 ({rules.min_area_um2:g}) is larger than max_area_um2 ({rules.max_area_um2:g})"
            )
        return rules

    def to_config(self) -> dict:
        return asdict(self)

    def margin_px(self, mpp: float) -> int:
        """Pixels of context around an object's box that cleaning it reads (the Gaussian's reach, and more)."""
        return math.ceil(4 * self.smooth_um / mpp) + 4


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
