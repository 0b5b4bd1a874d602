"""napari-nephro: kidney pathology on whole-slide images, in napari and headless."""

from .common.triton_guard import block_triton_without_gpu

block_triton_without_gpu()  # before anything imports torch: see common/triton_guard.py

from .io import Slide, SlideError, open_slide  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Slide", "SlideError", "__version__", "open_slide"]
