"""The tiled segmentation engine: any `Segmenter` over a region or a whole slide, seamless, resumable.

Nothing here imports napari or torch: the engine talks to models through the
`Segmenter` protocol (`napari_nephro.models`), so the U-Net family, SegGPT and the
nuclei models share it.
"""

from .api import RegionResult, SlideResult, classes_of, plan_run, segment_region, segment_slide
from .engine import Progress, RunStats
from .errors import SegmentError
from .instance_api import (
    InstanceRegionResult,
    InstanceSlideResult,
    NucleiSummary,
    read_nuclei_table,
    segment_instances_region,
    segment_instances_slide,
)
from .objects import ObjectRules, clean_labels
from .output import partial_path
from .plan import Plan, make_plan
from .summary import ObjectSummary, summarize

__all__ = [
    "InstanceRegionResult",
    "InstanceSlideResult",
    "NucleiSummary",
    "ObjectRules",
    "ObjectSummary",
    "Plan",
    "Progress",
    "RegionResult",
    "RunStats",
    "SegmentError",
    "SlideResult",
    "classes_of",
    "clean_labels",
    "make_plan",
    "partial_path",
    "plan_run",
    "read_nuclei_table",
    "segment_instances_region",
    "segment_instances_slide",
    "segment_region",
    "segment_slide",
    "summarize",
]
