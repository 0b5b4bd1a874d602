"""Checkpoint folders: `config.json` + `model.safetensors`, loaded without unpickling anything."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..common.atomic import atomic_output
from .config import ModelConfig
from .errors import ModelError
from .networks import build_network

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DEFAULT = "default"  # the name of the glomerulus model shipped inside the package
DEFAULT_FOLDER = Path(__file__).with_name("default")


def resolve_checkpoint(name: str | os.PathLike[str]) -> Path:
    """A checkpoint folder from a path, or from the name `default` (the shipped model)."""
    if str(name) == DEFAULT and not Path(name).exists():
        if not (DEFAULT_FOLDER / WEIGHTS).is_file():
            raise ModelError("the default model is missing from this installation: reinstall napari-nephro")
        return DEFAULT_FOLDER
    return Path(name)


def _hint(name: Path) -> str:
    """For a mistyped model name (`defualt`): the names that exist without a folder."""
    import difflib

    if len(name.parts) > 1:
        return ""  # a path the user meant as a folder
    if difflib.get_close_matches(str(name).lower(), [DEFAULT], n=1, cutoff=0.6):
        return f"; did you mean {DEFAULT!r}? (the shipped model)"
    return f"; {DEFAULT!r} names the shipped model"


def save_checkpoint(
    network: nn.Module,
    config: ModelConfig,
    folder: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    half: bool = False,
) -> Path:
    """Write the folder under a temporary name and rename it into place: never half a checkpoint.

    `half` stores floating-point weights as float16 (half the size; loading casts them back).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise ModelError(f"{folder}: already exists; pass --overwrite to replace it")
    if not folder.parent.exists():
        raise ModelError(f"{folder}: folder {folder.parent} does not exist")
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    bad = count_nonfinite(state)
    if bad:  # a diverged network: a checkpoint that would segment nonsense
        raise ModelError(f"{folder}: {bad} of {len(state)} weight tensors hold NaN or infinite values (diverged)")
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        bad = count_nonfinite(state)
        if bad:
            raise ModelError(
                f"{folder}: {bad} of {len(state)} weight tensors overflow float16: save without half precision"
            )
    with atomic_output(folder) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / WEIGHTS), metadata={"arch": config.arch})
        (tmp / CONFIG).write_text(config.to_json())
    return folder


def load_checkpoint(
    folder: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[nn.Module, ModelConfig]:
    """The network (in eval mode, on `device`) and its config; a wrong or incomplete folder is one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = resolve_checkpoint(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such checkpoint folder (it holds {CONFIG} and {WEIGHTS}){_hint(folder)}")
    config = ModelConfig.from_file(folder / CONFIG)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{folder}: no {WEIGHTS} beside {CONFIG}")
    network = build_network(config)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ModelError(f"{weights}: not a readable safetensors file ({_first_line(exc)})") from None
    missing, unexpected = _compare(network.state_dict(), state)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ModelError(
            f"{folder}: the weights do not fit a {config.arch} with encoder {config.encoder} "
            f"({len(missing)} missing, {len(unexpected)} unexpected or mis-shaped tensors, e.g. {example})"
        )
    bad = count_nonfinite(state)
    if bad:
        raise ModelError(
            f"{weights}: {bad} of {len(state)} tensors hold NaN or infinite values (a training run that diverged?): "
            "this checkpoint cannot segment; retrain it with a lower --lr"
        )
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as exc:  # e.g. a dtype that cannot be cast
        raise ModelError(f"{weights}: the weights do not load into a {config.arch} ({_first_line(exc)})") from None
    return network.to(device).eval(), config


def count_nonfinite(state: dict[str, torch.Tensor]) -> int:
    """How many floating-point tensors hold a NaN or an infinity."""
    return sum(1 for v in state.values() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0][:200] if lines else "") or exc.__class__.__name__


def _compare(expected: dict, found: dict) -> tuple[list[str], list[str]]:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected or tuple(found[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected
