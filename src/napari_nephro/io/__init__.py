"""Slides in, lazy multiscale pyramids with physical pixel sizes out.

`open_slide` picks OpenSlide for vendor formats (SVS, NDPI, MRXS, SCN, BIF, VMS,
Philips TIFF, DICOM WSI), tifffile for generic and OME pyramidal TIFF, and Pillow
for plain PNG/JPEG. This package never imports napari.
"""

from .cache import TileCache
from .errors import SlideError
from .open import SLIDE_EXTENSIONS, can_open, open_slide
from .slide import Level, Slide

__all__ = ["SLIDE_EXTENSIONS", "Level", "Slide", "SlideError", "TileCache", "can_open", "open_slide"]
