"""Keep triton out of a process that has no NVIDIA GPU: importing it there can kill the process.

The CUDA wheels of torch ship triton, and torchvision imports it (through
torch._dynamo) when it is first imported. Triton bundles its own LLVM; once
napari has an OpenGL context on Mesa's software renderer (llvmpipe, the usual
renderer of a machine without a GPU), or once TensorFlow is loaded, that import
ends in a segmentation fault. Triton runs only on NVIDIA (and ROCm) GPUs, so
where there is none, marking it absent loses nothing: torch then simply finds
no triton. Set NAPARI_NEPHRO_ALLOW_TRITON=1 to leave it alone.
"""

from __future__ import annotations

import glob
import os
import sys


def block_triton_without_gpu() -> bool:
    """Mark triton as not installed when no GPU device is present; True when it did."""
    if "triton" in sys.modules or os.environ.get("NAPARI_NEPHRO_ALLOW_TRITON") == "1":
        return False
    if not sys.platform.startswith("linux") or glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"):
        return False  # triton ships for Linux only; a GPU is there: triton may be of use
    sys.modules["triton"] = None  # `import triton` now raises ImportError, which torch takes as "no triton"
    return True
