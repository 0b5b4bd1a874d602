"""One function per job (evaluate, export; later segment, train, review), taking plain data and options."""

from .evaluate import EvaluationError, evaluate, evaluate_pair, load_labels
from .export import ExportError, export, export_tile_dataset, load_items

__all__ = [
    "EvaluationError",
    "ExportError",
    "evaluate",
    "evaluate_pair",
    "export",
    "export_tile_dataset",
    "load_items",
    "load_labels",
]
