"""Command line: `mmlens demo` writes the HTML report of both papers' analyses for the small
trained LLaVA the project ships (`mmlens.load("tiny-shapes")`) on synthetic VQA samples with
ground-truth boxes (`mmlens.zoo.shapes`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def demo(out: Path, n_samples: int, seed: int) -> None:
    import torch

    import mmlens
    from mmlens.inputs import input_settings
    from mmlens.report import describe_settings, write_report
    from mmlens.zoo.shapes import generate

    torch.set_num_threads(1)  # a tiny model is bound by per-op overhead: one thread is faster
    start = time.perf_counter()
    model = mmlens.load("tiny-shapes")
    cfg = model.cfg
    print(
        f"loaded {cfg.model_name}: {type(model).__name__}, {cfg.n_layers} decoder layers, "
        f"d_model={cfg.d_model}, vision {cfg.vision.n_layers} layers, {len(model.hook_dict)} hook points"
    )
    samples = generate(n_samples, seed=seed)
    print(f"{n_samples} synthetic VQA samples (seed {seed}); running the analyses ...")
    settings = input_settings(model.prepare(samples[0].image, samples[0].question))
    print(f"inputs: {describe_settings(settings)}")
    path = write_report(model, samples, out)
    print(f"wrote {path.resolve()} in {time.perf_counter() - start:.0f} s; open it in a browser")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmlens")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="write the analyses report for the shipped model"
    )
    demo_parser.add_argument("--out", type=Path, default=Path("mmlens-report.html"))
    demo_parser.add_argument(
        "--samples", type=int, default=28, help="VQA samples (4 per question type)"
    )
    demo_parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.out, args.samples, args.seed)


if __name__ == "__main__":
    main()
