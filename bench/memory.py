"""Peak memory of attention analyses on a long input: `attention_share(query="last")` against a
plain forward, measured side by side in one run.

On the LLaVA-NeXT-shaped input of `bench/forward.py --family next` (a 640 x 480 image -> 2,340
image tokens, 2,382 tokens; width 1024, 8 layers, fp32). Each measurement runs in a fresh child
process (peak RSS, `ru_maxrss`, only grows), which builds the model and the input, then runs one
thing: a plain forward, `attention_share` (only the last query row runs with explicit attention),
and, for reference, a forward that materialises every layer's `[head, pos, pos]` pattern (what
reading one row from a full pattern costs). The goal: attention_share within 1.2x of the forward.

    python bench/memory.py [--n-layers 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

RUNS = ("forward", "attention_share", "forward_with_patterns")


def child(run: str, n_layers: int) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from timing import LLAVA_15_SHAPE

    import mmlens
    from mmlens.analysis import attention_share
    from mmlens.testing import build_tiny_llava_next

    with tempfile.TemporaryDirectory() as folder:
        build_tiny_llava_next(folder, **{**LLAVA_15_SHAPE, "n_layers": n_layers})
        model = mmlens.from_pretrained(folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8))
    inp = model.prepare(image, "What colour is the shape in the top left corner of the picture?")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        if run == "forward":
            model(inp)
        elif run == "attention_share":
            attention_share(model, inp)
        else:
            names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
            model.run_with_hooks(inp, fwd_hooks=[(name, lambda p, hook: None) for name in names])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens": inp.input_ids.shape[1], "before_kb": before, "peak_kb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--child", choices=RUNS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.n_layers)
        return
    results = {}
    for run in RUNS:
        command = [sys.executable, __file__, "--child", run, "--n-layers", str(args.n_layers)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[run] = json.loads(output.strip().splitlines()[-1])
    print(f"tokens={results['forward']['tokens']} layers={args.n_layers} fp32 CPU; peak RSS:")
    reference = results["forward"]["peak_kb"]
    for run, numbers in results.items():
        print(
            f"{run:24s} {numbers['peak_kb'] / 1024:8.0f} MB   ratio vs forward "
            f"{numbers['peak_kb'] / reference:5.2f}   (model and input: "
            f"{numbers['before_kb'] / 1024:.0f} MB)"
        )


if __name__ == "__main__":
    main()
