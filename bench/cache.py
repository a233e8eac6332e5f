"""What caching costs on the shipped organism (`tiny-shapes`: 6 layers, d_model 128, 105
positions) on one CPU thread, where, as on a GPU, the fixed cost of each layer and hook weighs
more than the arithmetic: HF's forward (sdpa), HF's forward returning every hidden state,
mmlens' forward, `run_with_cache` of every hook (attention scores and patterns included) and of
the residual stream only. Interleaved medians; ratios against HF's forward.

    python bench/cache.py [--threads 1] [--repeats 50]
"""

from __future__ import annotations

import argparse

import torch
from timing import measure, report
from transformers import LlavaForConditionalGeneration

import mmlens
from mmlens.zoo import checkpoint_path
from mmlens.zoo.shapes import generate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = mmlens.load("tiny-shapes")
    hf = LlavaForConditionalGeneration.from_pretrained(
        checkpoint_path("tiny-shapes"), attn_implementation="sdpa"
    ).eval()
    sample = generate(1, seed=0)[0]
    inp = model.prepare(sample.image, sample.question)
    kwargs = inp.model_kwargs()

    def residuals(name: str) -> bool:
        return name.startswith("blocks.") and "hook_resid" in name

    runs = {
        "hf_sdpa_forward": lambda: hf(**kwargs).logits,
        "hf_forward_all_hidden_states": lambda: hf(**kwargs, output_hidden_states=True).logits,
        "mmlens_forward": lambda: model(inp),
        "mmlens_run_with_cache_all_hooks": lambda: model.run_with_cache(inp),
        "mmlens_run_with_cache_residuals": lambda: model.run_with_cache(
            inp, names_filter=residuals
        ),
    }
    with torch.inference_mode():
        difference = (hf(**kwargs).logits - model(inp)).abs().max()
        _, cache = model.run_with_cache(inp)
        print(
            f"tiny-shapes: {inp.input_ids.shape[1]} positions, threads={torch.get_num_threads()}, "
            f"{len(cache)} hook points cached in a full cache; max |logits HF - mmlens| "
            f"{float(difference):.1e}"
        )
        report(measure(runs, args.repeats, "cpu"), "hf_sdpa_forward")


if __name__ == "__main__":
    main()
