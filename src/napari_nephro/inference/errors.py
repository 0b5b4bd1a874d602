"""The one error type a segmentation run raises for a user's mistake."""


class SegmentError(Exception):
    """A wrong slide, region, model or output for a run: printed as one line."""
