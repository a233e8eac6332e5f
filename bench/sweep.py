"""Knockout-sweep speed: the paper's naive loop vs the mmlens engine, side by side.

On a LLaVA-1.5-shaped random checkpoint (576 image tokens, ~620 tokens, 16 decoder layers):
the three last-position flows plus Image→Question, every window centre (window 9), for one
sample. The naive loop runs one full forward per flow and centre (4·L forwards, as the paper's
code); the engine reuses the clean run's keys and values and recomputes only each flow's
suffix, all centres in one batch. The physical floor is one clean forward; the goal is the
whole sweep within 2x of it. Results of both are compared. Then LLaVA-CAM over every decoder
layer from one backward pass vs one backward pass per layer.

    python bench/sweep.py [--device cuda] [--dtype bfloat16] [--n-layers 16]
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
    error = ((engine.p_new - naive.p_new).abs() / naive.p_new).max()
    print(
        f"max relative difference engine vs naive: {error:.1e} over {len(engine)} (flow, centre) pairs"
    )
    print(f"naive / engine = {naive_seconds / medians['engine_sweep']:.1f}x")

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


if __name__ == "__main__":
    main()
