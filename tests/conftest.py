"""Shared fixtures: the real sample files, synthetic pyramids with known pixels, a private cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WSI = SHARED_DATA / "wsi"


def require_shared(*parts: str) -> Path:
    """Path into ../shared/data; skip when absent on a laptop, fail in CI (CI must test the real files)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"real sample data not found at {path}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run the tests on the real files")
        pytest.skip(message)
    return path


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep generated sample slides out of the user's cache folder."""
    cache = tmp_path_factory.mktemp("nephro-cache")
    old = os.environ.get("NAPARI_NEPHRO_CACHE")
    os.environ["NAPARI_NEPHRO_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("NAPARI_NEPHRO_CACHE", None)
    else:
        os.environ["NAPARI_NEPHRO_CACHE"] = old


def random_levels(shape: tuple[int, int], count: int, seed: int = 0, channels: int = 3) -> list[np.ndarray]:
    """Independent random pixels per level, so a level mix-up or an off-by-one cannot pass."""
    rng = np.random.default_rng(seed)
    levels = []
    h, w = shape
    for _ in range(count):
        dims = (h, w) if channels == 1 else (h, w, channels)
        levels.append(rng.integers(0, 256, dims, dtype=np.uint8))
        h, w = h // 2, w // 2
    return levels


def write_pyramid(path: Path, levels: list[np.ndarray], layout: str, mpp: float | None = 0.25, tile=(64, 48)) -> Path:
    """Write `levels` losslessly as a pyramid.

    layout: "ome" (levels in SubIFDs, OME-XML pixel size), "pages" (levels as
    successive reduced-resolution pages, as libvips and many scanners write them),
    or "strips" (level 0 only, stripped, 7 rows per strip).
    """
    import tifffile

    photometric = "rgb" if levels[0].ndim == 3 else "minisblack"
    common = {"photometric": photometric, "compression": "zlib"}
    resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    with tifffile.TiffWriter(path, ome=(layout == "ome")) as tif:
        if layout == "ome":
            meta = {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if mpp else {}
            tif.write(levels[0], subifds=len(levels) - 1, tile=tile, metadata=meta, **common)
            for level in levels[1:]:
                tif.write(level, subfiletype=1, tile=tile, metadata=None, **common)
        elif layout == "pages":
            for i, level in enumerate(levels):
                tif.write(level, subfiletype=1 if i else 0, tile=tile, metadata=None, **common, **resolution)
        elif layout == "strips":
            tif.write(levels[0], rowsperstrip=7, metadata=None, **common, **resolution)
        else:
            raise ValueError(layout)
    return path


@pytest.fixture
def notifications(monkeypatch) -> list[str]:
    """The messages the napari readers and writers show, captured instead of shown."""
    import napari_nephro.plugin.reading as reading

    shown: list[str] = []
    monkeypatch.setattr(reading, "notify", lambda message, error=True: shown.append(message))
    return shown


def tiny_seggpt(folder: Path | None = None, input_size: int = 32, seed: int = 0):
    """The real SegGPT architecture at toy size, random weights (no download); saved like a Hub download
    (config.json, model.safetensors, preprocessor_config.json) when `folder` is given."""
    import torch
    from transformers import SegGptConfig, SegGptForImageSegmentation, SegGptImageProcessor

    torch.manual_seed(seed)
    config = SegGptConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_dim=64,
        image_size=(2 * input_size, input_size),
        patch_size=16,
        pretrain_image_size=input_size,
        decoder_hidden_size=8,
        merge_index=1,
        intermediate_hidden_state_indices=(2, 3),
        drop_path_rate=0.0,
    )
    model = SegGptForImageSegmentation(config).eval()
    processor = SegGptImageProcessor(size={"height": input_size, "width": input_size})
    if folder is not None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return model, processor
