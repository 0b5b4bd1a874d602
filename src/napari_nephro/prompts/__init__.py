"""Prompt sets for SegGPT: a few examples (image crop + class mask) cut around painted or annotated objects.

A `PromptSet` is saved as a folder of PNG pairs plus a JSON index, so it can be
reopened, reviewed and shared. Nothing here imports napari or torch; the cutting
code (scipy) loads on first use, so the CLI starts fast.
"""

from ..common.lazy import lazy_attributes
from .errors import PromptError

_LAZY = {
    "SEGGPT_INPUT": "promptset",
    "Example": "promptset",
    "PromptSet": "promptset",
    "examples_from_annotations": "cut",
    "examples_from_labels": "cut",
}

__all__ = ["PromptError", *_LAZY]

__getattr__ = lazy_attributes(__name__, _LAZY)
