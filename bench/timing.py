"""Side-by-side timing shared by the benchmarks: medians of interleaved runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

# A LLaVA-1.5-shaped random checkpoint: 336 px, patch 14 -> 576 image tokens; decoder width 1024.
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


def bench_model(llava_shaped: bool, device: str):
    """The shipped tiny-shapes, or with `llava_shaped` a random checkpoint of `LLAVA_15_SHAPE`
    (576 image tokens), loaded on `device`."""
    import tempfile

    import mmlens
    from mmlens.testing import build_tiny_llava

    if not llava_shaped:
        return mmlens.load("tiny-shapes", device=device)
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_llava(folder, **LLAVA_15_SHAPE)
        return mmlens.from_pretrained(folder, device=device)


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of `fn` takes (GPU work included)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(runs: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds per method; methods interleaved so that drift hits each alike."""
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(samples) for name, samples in times.items()}


def report(medians: dict[str, float], reference: str, setting: str = "") -> None:
    """Print each median and its ratio to `reference`."""
    print(f"-- {setting}" if setting else "--")
    for name, median in medians.items():
        ratio = median / medians[reference]
        print(f"{name:40s} median {median * 1e3:9.2f} ms   ratio vs {reference} {ratio:5.3f}")
