"""Speed of one tiny-shapes training step (`train_shapes.shared_prefix_loss`, backward, AdamW):
the per-image key/value cache repeated by `expand` (what training uses when every image has the
same number of questions) vs `repeat_interleave` (the general path), side by side.

Same model, batch and questions for both (8 images x 12 questions, vision tower frozen as in
training); prints medians and the ratio against `repeat_interleave`.

    python bench/train_step.py [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from timing import measure, report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train/ is not installed

from mmlens.zoo.shapes import conversation, generate
from train import train_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    processor = train_shapes.make_processor()
    model = train_shapes.build_model(seed=0).train()
    model.model.vision_tower.requires_grad_(False)
    samples = generate(8, seed=1000, n_objects=(2, 3, 4))
    conversations = [conversation(sample, 12) for sample in samples]
    expand = train_shapes._repeat_per_image

    def interleave(tensor, repeats):
        return tensor.repeat_interleave(torch.tensor(repeats), dim=0)

    def step(repeat) -> None:
        train_shapes._repeat_per_image = repeat
        try:
            loss = train_shapes.shared_prefix_loss(model, processor, samples, conversations)
            model.zero_grad(set_to_none=True)
            loss.backward()
        finally:
            train_shapes._repeat_per_image = expand

    medians = measure(
        {"repeat_interleave": lambda: step(interleave), "expand": lambda: step(expand)},
        args.repeats,
        "cpu",
    )
    report(medians, "repeat_interleave", f"{args.threads} thread(s), 8 images x 12 questions")


if __name__ == "__main__":
    main()
