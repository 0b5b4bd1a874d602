"""A glomerulus model loaded after napari has drawn its canvas must not kill napari.

On a machine without a GPU, napari's OpenGL context comes from Mesa's software
renderer, and importing triton (which torchvision does through torch) after it
segfaulted the process: the Segment widget's first Run closed napari.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

AFTER_THE_CANVAS = """
import napari
from qtpy.QtWidgets import QApplication
viewer = napari.Viewer(show=True)
QApplication.processEvents()
from napari_nephro.models import TorchSegmenter
TorchSegmenter.from_checkpoint("default", device="cpu")
viewer.close()
print("loaded")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="triton and Mesa's llvmpipe: a Linux matter")
def test_the_default_model_loads_after_napari_has_drawn_its_canvas():
    done = subprocess.run([sys.executable, "-c", AFTER_THE_CANVAS], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]
