"""SegGPT speed: 448 px tiles per second with 1, 6 and 12 prompts, ViT-L at full size (random weights).

    python benchmarks/bench_seggpt.py [--device cuda] [--tiles 1] [--prompts 1 6 12] [--pairs 1 16]

The speed does not depend on the weights, so a randomly initialised
`SegGptForImageSegmentation(SegGptConfig())` (the BAAI/seggpt-vit-large
architecture) stands in for the download. Each row times `SegGptSegmenter.predict`
(processor, ensemble, palette distances) after one warm-up call; `pairs` is how
many tile x prompt pairs share one forward pass (1 on CPU; more fill a GPU).
The last column is what `SECONDS_PER_PAIR` in models/seggpt.py should hold.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from _table import print_table
from napari_nephro.models.seggpt import SegGptSegmenter
from napari_nephro.prompts import Example, PromptSet


def prompt_set(count: int, size: int) -> PromptSet:
    rng = np.random.default_rng(0)
    prompts = PromptSet(["glomerulus"], mpp=1.0, size=size)
    for i in range(count):
        mask = np.zeros((size, size), np.uint8)
        mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
        image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        prompts.add(Example(image, mask, "glomerulus", "bench", (float(i * size), 0.0, size, size)))
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiles", type=int, default=1, help="tiles per timed call")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 6, 12])
    parser.add_argument("--pairs", type=int, nargs="+", default=None, help="pairs per forward pass to compare")
    parser.add_argument("--quick", action="store_true", help="a toy-size SegGPT: checks the script, not the speed")
    args = parser.parse_args()
    from transformers import SegGptConfig, SegGptForImageSegmentation, SegGptImageProcessor

    torch.manual_seed(0)
    if args.quick:
        config = SegGptConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            mlp_dim=64,
            image_size=(64, 32),
            pretrain_image_size=32,
            decoder_hidden_size=8,
            merge_index=1,
            intermediate_hidden_state_indices=(2, 3),
        )
        size = 32
    else:
        config, size = SegGptConfig(), 448
    model = SegGptForImageSegmentation(config).eval()
    processor = SegGptImageProcessor(size={"height": size, "width": size})
    parameters = sum(p.numel() for p in model.parameters())
    device = torch.device(args.device)
    pairs_options = args.pairs or ([1] if device.type == "cpu" else [1, 16])
    tiles = np.random.default_rng(1).integers(0, 255, (args.tiles, size, size, 3), dtype=np.uint8)
    rows = []
    for count in args.prompts:
        for pairs in pairs_options:
            segmenter = SegGptSegmenter(model, processor, prompt_set(count, size), device=device, pairs_per_batch=pairs)
            segmenter.predict(tiles[:1])  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            segmenter.predict(tiles)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rows.append(
                (
                    count,
                    pairs,
                    args.tiles,
                    f"{args.tiles / seconds:.3f}",
                    f"{seconds / args.tiles:.2f}",
                    f"{seconds / args.tiles / count:.3f}",
                    f"{segmenter.seconds_per_tile():.2f}",
                )
            )
            print(rows[-1], flush=True)
    dtype = "float16" if device.type == "cuda" else "float32"
    print_table(
        f"SegGPT {'toy' if args.quick else 'ViT-L'} ({parameters / 1e6:.0f} M parameters), {size} px tiles, "
        f"{device.type} {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        ("prompts", "pairs/pass", "tiles", "tiles/s", "s/tile", "s/(tile x prompt)", "estimate s/tile"),
        rows,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory of the process: {peak:.1f} GiB (weights {parameters * 4 / 2**30:.1f} GiB in float32)")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
