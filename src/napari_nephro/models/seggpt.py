"""SegGPT (transformers) as a `Segmenter`: segment tiles the way a few painted examples are painted.

Two ways to get class labels, not grey levels:
- `per_class` (default, as in the BMC Nephrology paper): one run per class with
  that class's examples as white-on-black prompts; a pixel goes to the class that
  paints it most surely, if any paints it white.
- `palette`: one run with every example, each class painted in its colour of the
  processor's palette; a pixel goes to the nearest palette colour.
Several prompts for one tile are combined by SegGPT's feature ensemble (features
averaged across prompts inside the encoder). The ensemble is done per tile by
hooks on the attention blocks, so several tiles x prompts fill one batch on a GPU.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..common.text import duration
from ..prompts import PromptSet
from .device import pick_device
from .errors import ModelError

HF_ID = "BAAI/seggpt-vit-large"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # weights in several shards
PROCESSOR_CONFIG = "preprocessor_config.json"
HUB_HOST = "huggingface.co"
MODES = ("per_class", "palette")
SCORE_SCALE = 16.0  # grey levels per logit: a pixel painted 32 levels above mid-grey is ~88% foreground
# one 448-px tile with one prompt, ViT-L, measured by benchmarks/bench_seggpt.py
SECONDS_PER_PAIR = {"cpu": 15.0, "mps": 2.0, "cuda": 0.05}  # cpu: 2 cores, 14.6-18 s measured; others guessed
VIT_L_PARAMETERS = 370e6
PAIRS_PER_BATCH = {"cpu": 1, "mps": 4, "cuda": 16}  # tile x prompt pairs in one forward pass
# samples per attention call: SegGPT's global attention holds batch x heads x 1568^2 weights (and two
# copies), so 12 prompts of ViT-L in one call peaked at 14.5 GiB on CPU; in pairs of samples it is exact
# and bounded. None: the whole batch at once (a GPU has the memory and wants the width).
ATTENTION_CHUNK = {"cpu": 2, "mps": 2, "cuda": None}


def _missing(source: str, reason: str) -> ModelError:
    return ModelError(
        f"SegGPT weights {source!r} are not available here ({reason}): on a machine with internet run "
        f"`hf download {HF_ID} --local-dir seggpt-vit-large` (1.5 GB), copy the folder here and give it as "
        "--model seggpt:PATH (or the SegGPT field in napari)"
    )


def weights_source(source: str | os.PathLike[str] | None) -> Literal["folder", "hub", "other", "missing"]:
    """Where `source` names weights: a downloaded folder, a Hub id (owner/name), a folder of something
    else, or nothing."""
    source = str(source or HF_ID)
    path = Path(source).expanduser()
    if path.exists():
        return "folder" if (path / "config.json").is_file() else "other"
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        return "missing"
    return "hub"


def load_seggpt(source: str | os.PathLike[str] | None = None):
    """Model and image processor from a local folder, else a Hugging Face id (cache, then download)."""
    from transformers import SegGptForImageSegmentation, SegGptImageProcessor

    source = str(source or HF_ID)
    path = Path(source).expanduser()
    where = weights_source(source)
    if where == "other":
        raise ModelError(f"{path}: not a SegGPT folder (no config.json); it should hold a download of {HF_ID}")
    if where == "missing":
        raise _missing(source, "no such folder")
    local = where == "folder"
    name = str(path) if local else source
    if local:
        _check_weights_file(path)
    try:
        # weights from safetensors only: a pytorch_model.bin is refused in one line, never opened
        # (transformers would load it with torch's weights-only unpickler)
        model = _from_pretrained(SegGptForImageSegmentation, name, local, use_safetensors=True)
    except ValueError as exc:  # a folder of another model type
        raise ModelError(f"{source}: not a SegGPT checkpoint ({_first_line(exc)})") from None
    except OSError as exc:
        if local:  # present but unreadable: a damaged config.json, a folder without weights
            raise ModelError(f"{path}: cannot load SegGPT from it ({_first_line(exc)})") from None
        raise _missing(source, _first_line(exc)) from None
    except Exception as exc:  # damaged files: safetensors, JSON nested too deep, fields of the wrong type
        what = f"{path / WEIGHTS}: damaged" if type(exc).__name__ == "SafetensorError" and local else None
        raise ModelError(
            f"{what or f'{source}: damaged SegGPT weights or config'} ({type(exc).__name__}: {_first_line(exc)}); "
            f"download {HF_ID} again"
        ) from None
    if local and not (path / PROCESSOR_CONFIG).is_file():
        return model, SegGptImageProcessor()  # weights without a preprocessor config: the defaults are SegGPT's
    try:
        processor = _from_pretrained(SegGptImageProcessor, name, local)
    except OSError:
        if local:
            raise ModelError(f"{path / PROCESSOR_CONFIG}: not readable; delete it to use SegGPT's defaults") from None
        processor = SegGptImageProcessor()  # a Hub download without one
    except Exception as exc:
        raise ModelError(
            f"{source}: damaged {PROCESSOR_CONFIG} ({exc.__class__.__name__}: {_first_line(exc)}); "
            "delete it to use SegGPT's defaults"
        ) from None
    return model, processor


def _check_weights_file(path: Path) -> None:
    """Only safetensors are read: pickled weights (`pytorch_model.bin`, `.pth`) can run code when loaded."""
    if (path / WEIGHTS).is_file() or (path / WEIGHTS_INDEX).is_file():
        return
    pickled = sorted(f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt") and f.is_file())
    if pickled:
        raise ModelError(
            f"{path}: holds {', '.join(pickled)} (pickled weights, which napari-nephro never loads): convert it to "
            f"{WEIGHTS} on a machine you trust, or download {WEIGHTS} of {HF_ID} into this folder"
        )
    raise ModelError(f"{path}: no {WEIGHTS} beside config.json; download {WEIGHTS} of {HF_ID} into this folder")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else exc.__class__.__name__


def _from_pretrained(kind, name: str, local: bool, **options):
    """From a folder, else the Hugging Face cache, else a download; offline, fail at once instead of retrying."""
    if local:
        return kind.from_pretrained(name, local_files_only=True, **options)
    try:
        return kind.from_pretrained(name, local_files_only=True, **options)
    except OSError:
        if not _online(HUB_HOST):
            raise OSError("not in the Hugging Face cache, and huggingface.co cannot be reached") from None
        return kind.from_pretrained(name, **options)


def _online(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def seggpt_fingerprint(source: str | os.PathLike[str] | None) -> str:
    """Identifies the weights without reading 1.5 GB: file names, sizes and the config's bytes."""
    path = Path(str(source or HF_ID)).expanduser()
    digest = hashlib.sha256(str(source or HF_ID).encode())
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file():
                digest.update(f"{f.name}:{f.stat().st_size}".encode())
        digest.update((path / "config.json").read_bytes())
    return digest.hexdigest()[:16]


def _install_ensemble(model) -> None:
    """Hooks on every attention block that average the target half of its output over each tile's prompts.

    This is SegGPT's feature ensemble done per tile, so a batch can hold several
    tiles x prompts. Up to `merge_index` the batch holds the image stream then the
    mask stream (2 x tiles x prompts), afterwards tiles x prompts, tile-major; at
    `merge_index` itself both streams are averaged too, as transformers does. The
    group size is `model._nephro_ensemble` (1: off), set around each forward pass;
    the hooks are installed once per model, whatever number of prompt sets use it.
    """
    if getattr(model, "_nephro_ensemble_hooks", None):
        return
    model._nephro_ensemble = 1
    merge = model.config.merge_index

    def hook_for(index: int):
        streams, dims = (2, (2,)) if index < merge else (2, (0, 2)) if index == merge else (1, (2,))

        def hook(_module, _inputs, output):
            group = model._nephro_ensemble
            if group < 2:
                return None
            hidden = output[0]
            prompt, target = hidden.split(hidden.shape[1] // 2, dim=1)
            shape = target.shape
            grouped = target.reshape(streams, -1, group, *shape[1:])
            target = grouped.mean(dim=dims, keepdim=True).expand_as(grouped).reshape(shape)
            return (torch.cat([prompt, target], dim=1), *output[1:])

        return hook

    model._nephro_ensemble_hooks = [
        layer.attention.register_forward_hook(hook_for(i)) for i, layer in enumerate(model.model.encoder.layers)
    ]


def _install_attention_chunks(model) -> None:
    """Let each attention block run its batch in slices of `model._nephro_attention_chunk` samples.

    Attention is computed sample by sample, so slicing the batch changes nothing but
    the peak memory; the ensemble hooks still see the whole block's output.
    """
    if getattr(model, "_nephro_attention_chunk", "absent") != "absent":
        return
    model._nephro_attention_chunk = None
    for layer in model.model.encoder.layers:
        attention = layer.attention
        whole = attention.forward

        def forward(hidden_states, output_attentions=False, _whole=whole):
            size = model._nephro_attention_chunk
            if not size or hidden_states.shape[0] <= size or output_attentions:
                return _whole(hidden_states, output_attentions)
            parts = [_whole(part, False)[0] for part in hidden_states.split(size)]
            return (torch.cat(parts), None)

        attention.forward = forward


class SegGptSegmenter:
    """SegGPT with a prompt set: tiles at the set's mpp and crop size, class probabilities back."""

    kind: Literal["semantic"] = "semantic"

    def __init__(
        self,
        model,
        processor,
        prompts: PromptSet,
        *,
        mode: str = "per_class",
        device: torch.device | str = "cpu",
        fingerprint: str = "",
        pairs_per_batch: int | None = None,
        embedding_type: str = "instance",
        attention_chunk: int | str | None = "auto",
    ) -> None:
        if mode not in MODES:
            raise ModelError(f"unknown SegGPT mode {mode!r}: choose {' or '.join(MODES)}")
        prompts.check_usable()
        self.device = torch.device(device)
        self.half = self.device.type == "cuda"
        self.model = model.to(self.device, dtype=torch.float16 if self.half else torch.float32).eval()
        self.processor, self.prompts, self.mode = processor, prompts, mode
        self.embedding_type = embedding_type
        width = model.config.image_size[1] if isinstance(model.config.image_size, list | tuple) else None
        self.input_size = int(width or model.config.image_size)
        processor_size = processor.size.get("width") if isinstance(processor.size, dict) else None
        if processor_size and processor_size != self.input_size:
            raise ModelError(f"the SegGPT processor resizes to {processor_size} px, the model takes {self.input_size}")
        self.classes = list(prompts.classes)
        self.mpp, self.tile_size = prompts.mpp, prompts.size
        self.overlap = prompts.size // 4
        self.pairs_per_batch = pairs_per_batch or PAIRS_PER_BATCH.get(self.device.type, 1)
        self.fingerprint = hashlib.sha256(
            f"{fingerprint}:{prompts.fingerprint()}:{mode}:{embedding_type}".encode()
        ).hexdigest()[:16]
        self.parameters = sum(p.numel() for p in model.parameters())
        self._groups = self._prepare_prompts()
        _install_ensemble(model)
        _install_attention_chunks(model)
        self.attention_chunk = (
            ATTENTION_CHUNK.get(self.device.type, 2) if attention_chunk == "auto" else attention_chunk
        )

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str] | None,
        prompts: PromptSet,
        *,
        device: str = "auto",
        mode: str = "per_class",
        pairs_per_batch: int | None = None,
    ) -> SegGptSegmenter:
        prompts.check_usable()
        target = pick_device(device)
        model, processor = load_seggpt(source)
        return cls(
            model,
            processor,
            prompts,
            mode=mode,
            device=target,
            fingerprint=seggpt_fingerprint(source),
            pairs_per_batch=pairs_per_batch,
        )

    # -- prompts ---------------------------------------------------------------------
    @property
    def tiles_per_call(self) -> int:
        """Tiles the engine should hand `predict` at once so that a pass holds `pairs_per_batch` pairs."""
        return tiles_per_call(self.pairs_per_batch, prompts_per_run(self.prompts, self.mode))

    @property
    def prompt_count(self) -> int:
        return sum(len(g[1]) for g in self._groups)

    def missing_classes(self) -> list[str]:
        """Classes without an example: SegGPT cannot find them."""
        return [c for c, n in self.prompts.counts().items() if not n]

    def _prepare_prompts(self) -> list[tuple[list[int], torch.Tensor, torch.Tensor, int]]:
        """(class ids, prompt images, prompt masks, palette size) per run: one per class, or one for all."""
        if self.mode == "palette":
            examples = self.prompts.examples
            masks = [e.mask for e in examples]
            runs = [(list(range(1, len(self.classes) + 1)), examples, masks, len(self.classes))]
        else:
            runs = []
            for class_id, name in enumerate(self.classes, start=1):
                examples = self.prompts.of_class(name)
                if examples:
                    masks = [(e.mask == class_id).astype(np.uint8) for e in examples]
                    runs.append(([class_id], examples, masks, 1))
        groups = []
        for ids, examples, masks, labels in runs:
            encoded = self.processor(
                images=None,
                prompt_images=[np.array(e.image) for e in examples],  # writable copies for torch
                prompt_masks=masks,
                num_labels=labels,
                input_data_format="channels_last",
                return_tensors="pt",
            )
            dtype = torch.float16 if self.half else torch.float32
            groups.append(
                (
                    ids,
                    encoded["prompt_pixel_values"].to(self.device, dtype),
                    encoded["prompt_masks"].to(self.device, dtype),
                    labels,
                )
            )
        return groups

    # -- prediction -------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, C, H, W) float32: a foreground probability for one class,
        else background then each class."""
        if tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"tiles must be (N, H, W, 3) RGB, not {tiles.shape}")
        n, height, width = tiles.shape[:3]
        pixels = self.processor(images=list(np.array(tiles)), input_data_format="channels_last", return_tensors="pt")[
            "pixel_values"
        ]  # writable copies
        pixels = pixels.to(self.device, torch.float16 if self.half else torch.float32)
        scores = torch.zeros((n, len(self.classes) + 1, self.input_size, self.input_size), device=self.device)
        for ids, prompt_pixels, prompt_masks, labels in self._groups:
            distances = self._paint(pixels, prompt_pixels, prompt_masks, labels)  # (N, L + 1, S, S)
            if self.mode == "palette":
                scores = torch.softmax(-distances / self._temperature(), dim=1)
            else:
                foreground = torch.softmax(-distances / self._temperature(), dim=1)[:, 1]
                scores[:, ids[0]] = foreground
        if self.mode == "per_class":
            # background is 1 - the surest class, and the classes share the rest in proportion: a pixel is
            # foreground exactly when some class paints it with at least the threshold, as with one class
            best = scores[:, 1:].amax(dim=1, keepdim=True)
            scores[:, 1:] = scores[:, 1:] * best / scores[:, 1:].sum(dim=1, keepdim=True).clamp_min(1e-6)
            scores[:, :1] = 1 - best
        if len(self.classes) == 1:
            scores = scores[:, 1:]
        if (height, width) != scores.shape[-2:]:
            scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
        return scores.float().cpu().numpy()

    @staticmethod
    def _temperature() -> float:
        # softmax over -(squared RGB distance): the distances of two palette colours 255 apart differ by
        # 2 * 255 * 3 per grey level summed over 3 channels
        return 2 * 255 * 3 * SCORE_SCALE

    def _paint(self, pixels, prompt_pixels, prompt_masks, labels: int) -> torch.Tensor:
        """SegGPT's painting of every tile after the prompts, as squared distances to each palette colour."""
        prompts = len(prompt_pixels)
        tiles_per_pass = max(1, self.pairs_per_batch // prompts)
        out = []
        for start in range(0, len(pixels), tiles_per_pass):
            chunk = pixels[start : start + tiles_per_pass]
            t = len(chunk)
            self.model._nephro_ensemble = prompts
            self.model._nephro_attention_chunk = self.attention_chunk
            try:
                encoded = self.model.model(  # the encoder; SegGptForImageSegmentation.forward minus the decoder
                    pixel_values=chunk.repeat_interleave(prompts, dim=0),
                    prompt_pixel_values=prompt_pixels.repeat(t, 1, 1, 1),
                    prompt_masks=prompt_masks.repeat(t, 1, 1, 1),
                    embedding_type=self.embedding_type,
                    feature_ensemble=False,
                    return_dict=True,
                )
            finally:
                self.model._nephro_ensemble, self.model._nephro_attention_chunk = 1, None
            # the ensemble made every prompt of a tile paint alike: decode the first only (the decoder at
            # 896 x 448 x 64 per sample was half the peak memory with 12 prompts)
            hidden = torch.cat(encoded.intermediate_hidden_states, dim=-1)[::prompts]
            painted = self.model.decoder(hidden)
            painted = painted[:, :, painted.shape[2] // 2 :, :].float()
            out.append(self._distances(painted, labels))
        return torch.cat(out)

    def _distances(self, painted: torch.Tensor, labels: int) -> torch.Tensor:
        mean = torch.tensor(self.processor.image_mean, device=painted.device).view(1, 3, 1, 1)
        std = torch.tensor(self.processor.image_std, device=painted.device).view(1, 3, 1, 1)
        rgb = ((painted * std + mean) * 255).clamp(0, 255)
        palette = torch.tensor(self.processor.get_palette(labels), dtype=torch.float32, device=painted.device)
        return ((rgb.unsqueeze(1) - palette.view(1, -1, 3, 1, 1)) ** 2).sum(dim=2)

    # -- cost -------------------------------------------------------------------------
    def seconds_per_tile(self) -> float:
        """What one tile costs with all prompts here (benchmark figures scaled by the network's size)."""
        return seconds_per_tile(self.prompt_count, self.device.type, self.parameters)


LONG_RUN_SECONDS = 600  # beyond this a CPU user is advised to segment less, and napari asks before starting


def run_cost(tiles: int, prompts: int, device: str, parameters: float = VIT_L_PARAMETERS) -> tuple[float, str]:
    """Seconds a run of `tiles` tissue tiles takes, and the sentence saying so before it starts."""
    seconds = tiles * seconds_per_tile(prompts, device, parameters)
    return seconds, f"{tiles} tissue tiles x {prompts} prompts: about {duration(seconds)} on {device}"


def prompts_per_run(prompts: PromptSet, mode: str) -> list[int]:
    """Prompts in each SegGPT run over a tile: one run per class that has examples, or one for all."""
    return [len(prompts)] if mode == "palette" else [n for n in prompts.counts().values() if n]


def tiles_per_call(pairs_per_batch: int, prompts_per_run: list[int]) -> int:
    """Tiles per `predict` call that fill passes of `pairs_per_batch` tile x prompt pairs (at least 1)."""
    return max(1, pairs_per_batch // max(1, min(prompts_per_run, default=1)))


def seconds_per_tile(prompts: int, device: str, parameters: float = VIT_L_PARAMETERS) -> float:
    """Seconds SegGPT spends on one tile with `prompts` prompts on a `device` ("cpu", "cuda", "mps")."""
    per_pair = SECONDS_PER_PAIR.get(device, SECONDS_PER_PAIR["cpu"])
    return per_pair * prompts * parameters / VIT_L_PARAMETERS


__all__ = [
    "HF_ID",
    "LONG_RUN_SECONDS",
    "MODES",
    "SegGptSegmenter",
    "load_seggpt",
    "run_cost",
    "seconds_per_tile",
    "tiles_per_call",
    "weights_source",
]
