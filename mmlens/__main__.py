"""Command line.

- `mmlens demo` writes the HTML report of both papers' analyses for the small trained LLaVA the
  project ships (`mmlens.load("tiny-shapes")`) on synthetic VQA samples with ground-truth boxes
  (`mmlens.zoo.shapes`).
- `mmlens run EXPERIMENT --model M --data FORMAT:PATH --out DIR [...]` runs an experiment over a
  data set, resumably, on one process or many (`mmlens.experiments.run`; docs/experiments.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


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


def _list(kind: type) -> Any:
    """An argparse type for comma-separated lists (``8,12`` -> [8, 12])."""

    def parse(text: str) -> list:
        return [kind(part) for part in text.split(",") if part]

    return parse


def _layer(text: str) -> int | str:
    """A decoder layer number, or a vision layer name such as ``vision.blocks.3``."""
    return int(text) if text.lstrip("-").isdigit() else text


def _final_norm(text: str) -> bool | str:
    """The logit lens' final-norm rule: true, false or last_layer."""
    rules = {"true": True, "false": False, "last_layer": "last_layer"}
    if text.lower() not in rules:
        raise argparse.ArgumentTypeError(f"{text!r}: use true, false or last_layer")
    return rules[text.lower()]


# Experiment options on the command line: flag -> (option name, type, help).
RUN_OPTIONS = {
    "--window-size": ("window_size", int, "knockout: layers per window (default: the preset's)"),
    "--centres": ("centres", _list(int), "knockout: window centres, e.g. 0,4,8 (default: all)"),
    "--flows": ("flows", _list(str), "knockout: flow names to run (default: the preset's)"),
    "--patch-rule": ("patch_rule", str, "knockout: 'mask' or 'geometric' (default: the preset's)"),
    "--modules": ("modules", _list(str), "module-jaccard: attn,mlp"),
    "--window": ("window", int, "module-jaccard: layers zeroed from each layer on"),
    "--k": ("k", int, "module-jaccard: top-k words; fastv: the pruning layer"),
    "--heads": ("heads", str, "attention-share: mean or max over heads"),
    "--layers": ("layers", _list(_layer), "truncation: truncation layers; cam: layers"),
    "--keep": ("keep", int, "truncation: image tokens kept (0: all removed)"),
    "--rank": ("rank", str, "truncation: rank by the 'last' row or the 'mean' of all rows"),
    "--mode": ("mode", str, "cliff, truncation, fastv: 'drop' tokens or 'mask' them"),
    "--ratio": ("ratio", float, "fastv: kept fraction of image tokens"),
    "--noise-std": ("noise_std", float, "cam: SmoothGrad noise std (0: one noiseless run)"),
    "--final-norm": ("apply_final_norm", _final_norm, "logit-lens: true, false or last_layer"),
    "--n-samples": ("n_samples", int, "cam: SmoothGrad samples"),
    "--sae": ("sae", str, "sae-features: SAE folder (SAELens, Gemma Scope) or zoo name"),
}


def run_command(args: argparse.Namespace) -> None:
    import mmlens
    from mmlens.experiments import EXPERIMENTS
    from mmlens.results import describe, summary

    options = {name: getattr(args, name) for name, _, _ in RUN_OPTIONS.values()}
    options = {name: value for name, value in options.items() if value is not None}
    if args.no_baseline:
        options["baseline"] = False
    allowed = set(EXPERIMENTS[args.experiment].options)
    wrong = sorted(set(options) - allowed)
    if wrong:
        flags = [flag for flag, (name, _, _) in RUN_OPTIONS.items() if name in wrong]
        flags += ["--no-baseline"] * ("baseline" in wrong)
        raise SystemExit(
            f"mmlens run {args.experiment}: {', '.join(flags)} does not apply to this experiment"
        )
    result = mmlens.run(
        args.experiment,
        args.model,
        args.data,
        args.out,
        preset=args.preset,
        images=args.images,
        batch_size=args.batch_size,
        limit=args.limit,
        correct_only=args.correct_only,
        skip_bad=args.skip_bad,
        device=args.device,
        dtype=args.dtype,
        shard=args.shard,
        retry_failed=args.retry_failed,
        relabel=args.relabel,
        **options,
    )
    print(f"{args.out}: {describe(result)}")
    if args.experiment in ("truncation", "fastv", "cliff") and len(result):
        print(summary(result).to_string(index=False))


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
    run_parser = commands.add_parser(
        "run",
        help="run an experiment over a data set (resumable; see docs/experiments.md)",
        description="Run EXPERIMENT over a data set; re-running the same command resumes it.",
    )
    run_parser.add_argument(
        "experiment",
        choices=[
            "knockout", "logit-lens", "module-jaccard", "attention-share", "cam", "cliff",
            "truncation", "fastv", "sae-features",
        ],
    )  # fmt: skip
    run_parser.add_argument(
        "--model", required=True, help="checkpoint folder, cached hub id or zoo name"
    )
    run_parser.add_argument(
        "--data", required=True, help="FORMAT:PATH, e.g. gqa:ChooseAttr.csv, shapes:64"
    )
    run_parser.add_argument("--images", help="image folder of the data set")
    run_parser.add_argument("--out", required=True, type=Path, help="run directory")
    run_parser.add_argument("--preset", help="cross_modal_flow, redundancy_to_relevance, ...")
    run_parser.add_argument("--batch-size", type=int, default=8)
    run_parser.add_argument("--limit", type=int, help="only the first N samples")
    filter_group = run_parser.add_mutually_exclusive_group()
    filter_group.add_argument(
        "--correct-only",
        dest="correct_only",
        action="store_true",
        default=None,
        help="only correctly answered samples (default: the preset's rule)",
    )
    filter_group.add_argument("--all-samples", dest="correct_only", action="store_false")
    run_parser.add_argument("--skip-bad", action="store_true", help="leave out malformed rows")
    run_parser.add_argument(
        "--retry-failed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run samples that failed in an earlier attempt again (default: on)",
    )
    run_parser.add_argument(
        "--relabel",
        action="store_true",
        help="label committed batches that have no readable manifest with these settings",
    )
    run_parser.add_argument("--device", help="default: the launcher's device, else cpu")
    run_parser.add_argument("--dtype", default="float32")
    run_parser.add_argument("--shard", help="INDEX/COUNT (default: from the launcher)")
    run_parser.add_argument(
        "--no-baseline", action="store_true", help="truncation, fastv: skip the untouched baseline"
    )
    for flag, (name, kind, text) in RUN_OPTIONS.items():
        run_parser.add_argument(flag, dest=name, type=kind, help=text)
    delta_parser = commands.add_parser(
        "apply-delta",
        help="write a release published as a delta over a base model (docs/checkpoints.md)",
        description="Write TARGET = BASE + DELTA from local folders (no download).",
    )
    delta_parser.add_argument("--base", required=True, type=Path, help="the base model's folder")
    delta_parser.add_argument("--delta", required=True, type=Path, help="the delta release")
    delta_parser.add_argument("--out", required=True, type=Path, help="where to write the model")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.out, args.samples, args.seed)
    elif args.command == "run":
        run_command(args)
    elif args.command == "apply-delta":
        from mmlens.models.delta import apply_delta

        print(f"wrote {apply_delta(args.base, args.delta, args.out)}")


if __name__ == "__main__":
    main()
