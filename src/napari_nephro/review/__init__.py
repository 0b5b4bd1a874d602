"""Human in the loop (Guo et al.): review projects, ratings, fusion and agreement, easy / hard sets. No napari."""

from .layout import RATINGS, ModelEntry, Patch, Project, ReviewError, SlideEntry, is_project, read_project

__all__ = ["RATINGS", "ModelEntry", "Patch", "Project", "ReviewError", "SlideEntry", "is_project", "read_project"]
