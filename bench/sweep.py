"""Knockout-sweep speed: the paper's naive loop vs the mmlens engine, side by side.

On a LLaVA-1.5-shaped random checkpoint (576 image tokens, 618 tokens, 16 decoder layers):
the three last-position flows plus Image→Question, every window centre (window 9), for one
sample. The naive loop runs one full forward per flow and centre (4·L forwards, as the paper's
code); the engine runs the input once and recomputes each variant only from its window's first
layer and its flow's first target on (docs/analyses.md). The physical floor is one forward; the
goal is the whole sweep within 1.5x of it. Results of both are compared.

Then throughput across samples: `--samples` samples (different images and question lengths,
so padded) swept as one padded batch vs one at a time, with a check that both give the same
numbers. `--cam` adds LLaVA-CAM over every decoder layer from one backward pass vs one backward
pass per layer.

    python bench/sweep.py [--device cuda] [--dtype bfloat16] [--n-layers 16] [--samples 32]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from PIL import Image
from timing import LLAVA_15_SHAPE, measure, report, timed

import mmlens
from mmlens.analysis import PAPER_FLOWS, knockout_sweep, llava_cam
from mmlens.testing import build_tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--n-layers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--cam", action="store_true", help="also time LLaVA-CAM")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        build_tiny_llava(folder, **{**LLAVA_15_SHAPE, "n_layers": args.n_layers})
        model = mmlens.from_pretrained(folder, dtype=getattr(torch, args.dtype), device=args.device)
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (400, 300, 3), dtype=np.uint8)
    )
    inp = model.prepare(image, "What colour is the shape in the top left corner of the picture?")
    print(
        f"device={args.device} dtype={args.dtype} tokens={inp.input_ids.shape[1]} "
        f"image_tokens={len(inp.positions('image'))} layers={args.n_layers} flows={list(PAPER_FLOWS)}"
    )

    def sweep(method: str):
        return knockout_sweep(model, inp, PAPER_FLOWS, 9, method=method, progress=False)

    with torch.inference_mode():
        medians = measure(
            {"one_forward": lambda: model(inp), "engine_sweep": lambda: sweep("engine")},
            args.repeats,
            args.device,
        )
        results = {}
        # 4·L full forwards: timed once, and its result kept for the comparison.
        naive_seconds = timed(lambda: results.update(naive=sweep("naive")), args.device)
        engine = sweep("engine")
    medians["naive_sweep (timed once)"] = naive_seconds
    report(medians, reference="one_forward")
    naive = results["naive"]
    print(f"engine vs naive over {len(engine)} (flow, centre) pairs: {_difference(engine, naive)}")
    print(f"naive / engine = {naive_seconds / medians['engine_sweep']:.1f}x")

    samples_per_second(model, args)
    if args.cam:
        cam_one_backward(model, inp, args)


def samples_per_second(model, args) -> None:
    """The paper's four flows over `args.samples` samples: one padded batch vs one at a time."""
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 255, (300 + 10 * i, 400, 3), dtype=np.uint8))
        for i in range(args.samples)
    ]
    questions = [
        "What colour is the shape" + " in the top left corner" * (i % 4) + "?"
        for i in range(args.samples)
    ]
    batch = model.prepare(images, questions)
    one_by_one = [model.prepare(image, q) for image, q in zip(images, questions, strict=True)]
    results = {}

    def sweep(name, inputs):
        results[name] = knockout_sweep(model, inputs, PAPER_FLOWS, 9, progress=False)

    with torch.inference_mode():
        seconds = {
            "one padded batch": timed(lambda: sweep("batch", batch), args.device),
            "one sample at a time": timed(lambda: sweep("single", one_by_one), args.device),
        }
    print(f"-- {args.samples} samples, lengths {batch.attention_mask.sum(1).unique().tolist()}")
    for name, value in seconds.items():
        print(f"{name:40s} {value:8.2f} s   {args.samples / value:7.2f} samples/s")
    single, together = results["single"], results["batch"]
    print(
        f"batched / one at a time: {seconds['one sample at a time'] / seconds['one padded batch']:.2f}x faster; "
        f"{_difference(together, single)}"
    )


def cam_one_backward(model, inp, args) -> None:
    """LLaVA-CAM of every decoder layer from one backward pass vs one backward per layer."""
    layers = list(range(args.n_layers))
    with torch.no_grad():
        answer = [int(model(inp)[0, -1].argmax())]

    def cam(layer_sets: list[list[int]]) -> list:
        return [
            llava_cam(model, inp, answer, layers=ls, noise_std=0.0, progress=False)
            for ls in layer_sets
        ]

    cam_medians = measure(
        {
            "cam_all_layers_one_backward": lambda: cam([layers]),
            "cam_one_backward_per_layer": lambda: cam([[layer] for layer in layers]),
        },
        args.repeats,
        args.device,
    )
    report(cam_medians, reference="cam_all_layers_one_backward")


def _difference(result, reference) -> str:
    """How far `result.p_new` is from `reference.p_new`: the largest absolute difference, and
    the largest relative one among probabilities above 1% (a relative error of a probability
    near 0 says nothing in half precision)."""
    absolute = (result.p_new - reference.p_new).abs()
    large = reference.p_new > 0.01
    relative = (absolute[large] / reference.p_new[large]).max() if large.any() else float("nan")
    return f"max |difference| of p_new {absolute.max():.1e}; max relative (p > 1%) {relative:.1e}"


if __name__ == "__main__":
    main()
