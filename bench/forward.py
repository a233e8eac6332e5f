"""Forward-pass speed: HF `LlavaForConditionalGeneration` (sdpa) vs mmlens, side by side.

Builds a LLaVA-1.5-shaped random checkpoint (336px image, patch 14 -> 576 image tokens,
decoder width 1024) in a temporary folder, loads it with both libraries and times, interleaved
in one run: HF forward, mmlens forward, and mmlens `run_with_cache` with every hook cached.
Prints medians and the ratios against HF; also checks that the logits agree.

    python bench/forward.py [--device cuda] [--dtype bfloat16] [--repeats 7]
    MMLENS_KEEP_FREED_MEMORY=0 python bench/forward.py   # CPU: glibc's default allocator behaviour
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

import mmlens
from mmlens.testing import build_tiny_llava

LLAVA_15_SHAPE = dict(
    n_layers=8,
    d_model=1024,
    n_heads=16,
    d_mlp=2816,
    vision_layers=4,
    vision_d_model=256,
    vision_heads=4,
    image_size=336,
    patch_size=14,
)


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=7)
    for field in ("d_model", "n_layers", "n_heads", "d_mlp"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=LLAVA_15_SHAPE[field])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    shape = {
        **LLAVA_15_SHAPE,
        **{f: getattr(args, f) for f in ("d_model", "n_layers", "n_heads", "d_mlp")},
    }

    with tempfile.TemporaryDirectory() as folder:
        build_tiny_llava(folder, **shape)
        hf = LlavaForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, attn_implementation="sdpa"
        )
        hf = hf.to(args.device).eval()
        model = mmlens.from_pretrained(folder, dtype=dtype, device=args.device)

    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (400, 300, 3), dtype=np.uint8)
    )
    inp = model.prepare(image, "What colour is the shape in the top left corner of the picture?")
    kwargs = inp.model_kwargs()
    n_tokens = kwargs["input_ids"].shape[1]
    n_image = int((kwargs["input_ids"] == model.cfg.image_token_id).sum())
    print(
        f"device={args.device} dtype={args.dtype} tokens={n_tokens} image_tokens={n_image} {shape}"
    )

    runs = {
        "hf_sdpa_forward": lambda: hf(**kwargs).logits,
        "mmlens_forward": lambda: model(inp),
        "mmlens_run_with_cache_all_hooks": lambda: model.run_with_cache(inp),
    }
    with torch.inference_mode():
        hf_logits, mm_logits = hf(**kwargs).logits.float(), model(inp).float()
        relative = (hf_logits - mm_logits).abs().max() / hf_logits.abs().max()
        same_top1 = (hf_logits.argmax(-1) == mm_logits.argmax(-1)).float().mean()
        print(
            f"max |logits_hf - logits_mmlens| / max |logits_hf| = {relative:.1e}; same argmax {same_top1:.1%}"
        )
        keeps_memory = args.device == "cpu" and os.environ.get("MMLENS_KEEP_FREED_MEMORY") != "0"
        setting = "CPU allocator keeps freed memory (mmlens.perf)" if keeps_memory else ""
        report(measure(runs, args.repeats, args.device), setting)


def measure(runs: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per method; methods interleaved so that drift hits each alike."""
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(samples) for name, samples in times.items()}


def report(medians: dict[str, float], setting: str) -> None:
    print(f"-- {setting}" if setting else "--")
    reference = medians["hf_sdpa_forward"]
    for name, median in medians.items():
        print(
            f"{name:34s} median {median * 1e3:9.2f} ms   ratio vs HF sdpa {median / reference:5.3f}"
        )


if __name__ == "__main__":
    main()
