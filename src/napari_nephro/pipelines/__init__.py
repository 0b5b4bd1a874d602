"""One function per job (evaluate; later segment, train, review), taking plain data and options."""

from .evaluate import EvaluationError, evaluate, evaluate_pair, load_labels

__all__ = ["EvaluationError", "evaluate", "evaluate_pair", "load_labels"]
