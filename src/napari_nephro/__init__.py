"""napari-nephro: kidney pathology on whole-slide images, in napari and headless."""

from .io import Slide, SlideError, open_slide

__version__ = "0.1.0"
__all__ = ["Slide", "SlideError", "__version__", "open_slide"]
