"""Token pruning speed: full forward vs image tokens dropped from the middle layer on, and vs
FastV (k = 2, keep ratio 0.5), side by side on a LLaVA-1.5-shaped random checkpoint.

The Cross-modal paper reports ~40% less time when image tokens are removed from the last 20 of
40 layers; here dropping them from the middle layer must save at least 35%. Also checks that
pruning and masking (mode="mask") give the same last-position logits.

    python bench/pruning.py [--device cuda] [--dtype bfloat16] [--repeats 7]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from PIL import Image
from timing import LLAVA_15_SHAPE, measure, report

import mmlens
from mmlens.ablations import drop_tokens, fastv
from mmlens.testing import build_tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        build_tiny_llava(folder, **LLAVA_15_SHAPE)
        model = mmlens.from_pretrained(folder, dtype=getattr(torch, args.dtype), device=args.device)
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (400, 300, 3), dtype=np.uint8)
    )
    inp = model.prepare(image, "What colour is the shape in the top left corner of the picture?")
    image_positions, middle = inp.positions("image"), model.cfg.n_layers // 2
    pruned_and_masked = {
        f"image_tokens_dropped_from_layer_{middle}": (
            drop_tokens(image_positions, middle),
            drop_tokens(image_positions, middle, mode="mask"),
        ),
        "fastv_k2_keep_0.5": (
            fastv(2, 0.5, image_positions=image_positions),
            fastv(2, 0.5, image_positions=image_positions, mode="mask"),
        ),
    }
    print(
        f"device={args.device} dtype={args.dtype} tokens={inp.input_ids.shape[1]} "
        f"image_tokens={len(image_positions)} layers={model.cfg.n_layers}"
    )
    runs = {"full_forward": lambda: model(inp)}
    with torch.inference_mode():
        for name, (pruned_hooks, masked_hooks) in pruned_and_masked.items():
            pruned = model.run_with_hooks(inp, fwd_hooks=pruned_hooks)[:, -1]
            masked = model.run_with_hooks(inp, fwd_hooks=masked_hooks)[:, -1]
            print(
                f"{name}: max |pruned - masked| at the last position = {(pruned - masked).abs().max():.1e}"
            )
            runs[name] = lambda hooks=pruned_hooks: model.run_with_hooks(inp, fwd_hooks=hooks)
        report(measure(runs, args.repeats, args.device), reference="full_forward")


if __name__ == "__main__":
    main()
