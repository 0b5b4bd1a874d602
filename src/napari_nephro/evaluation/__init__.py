"""Compare predictions with ground truth the way the papers do: Dice, TP/FP/FN maps, matched instances.

Every ratio whose denominator is zero is None ("undefined"), never a silent 0 or 1.
"""

from .instances import MatchResult, match_instances
from .pixel import PixelScores, pixel_scores, pixel_scores_per_class
from .summary import object_table, per_crop, summarize
from .tpfpfn import TPFPFN_COLORS, tp_fp_fn_map

__all__ = [
    "TPFPFN_COLORS",
    "MatchResult",
    "PixelScores",
    "match_instances",
    "object_table",
    "per_crop",
    "pixel_scores",
    "pixel_scores_per_class",
    "summarize",
    "tp_fp_fn_map",
]
