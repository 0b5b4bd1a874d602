"""Where a model runs: CUDA, then Apple MPS, then CPU, or what the user asks for."""

from __future__ import annotations

import torch

from .errors import ModelError

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(requested: str = "auto") -> torch.device:
    """The device to run on; asking for one this machine lacks is a one-line error, not a silent fallback."""
    name = requested.split(":")[0]
    if name not in DEVICES:
        raise ModelError(f"unknown device {requested!r}: choose one of {', '.join(DEVICES)}")
    cuda, mps = (
        torch.cuda.is_available(),
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    )
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name == "cuda" and not cuda:
        raise ModelError("CUDA was asked for but this machine has no usable NVIDIA GPU: use --device cpu (or auto)")
    if name == "mps" and not mps:
        raise ModelError("MPS was asked for but this machine has no Apple GPU: use --device cpu (or auto)")
    return torch.device(requested)
