"""Command line.

- `mmlens demo` writes the HTML report of both papers' analyses for the small trained LLaVA the
  project ships (`mmlens.load("tiny-shapes")`) on synthetic VQA samples with ground-truth boxes
  (`mmlens.zoo.shapes`).
- `mmlens run EXPERIMENT --model M --data FORMAT:PATH --out DIR [...]` runs an experiment over a
  data set, resumably, on one process or many (`mmlens.experiments.run`; docs/experiments.md).

A user's mistake ends in one line on stderr that says what is wrong and what to do, and a
non-zero exit (`--debug` shows the traceback); docs/experiments.md, "The command line", lists the
exit codes. Nothing heavy is imported before a command runs: `mmlens --help` answers at once.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

EXIT_ERROR = 1
"""A command that could not do its work (a wrong name or value, unreadable data, a resume with
other settings, a run that measured nothing)."""
EXIT_USAGE = 2
"""A command line argparse cannot read (argparse's own code)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT, as shells report it)."""


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

    parse.__name__ = f"comma-separated {kind.__name__}"  # argparse's "invalid ... value" names it
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
        raise ValueError(f"{', '.join(flags)} does not apply to experiment {args.experiment!r}")
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


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error that suggests the closest name for a misspelt choice or
    option."""

    def error(self, message: str) -> NoReturn:
        words = re.findall(r"invalid choice: '([^']*)'|unrecognized arguments: (\S+)", message)
        for choice, flag in words:
            known = self._known_choices() if choice else self._known_flags()
            close = difflib.get_close_matches(choice or flag.split("=")[0], known, n=1)
            if close:
                message += f"; did you mean {close[0]}?"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _known_flags(self) -> list[str]:
        parsers = [self, *self._subparser_choices().values()]
        return [flag for parser in parsers for flag in parser._option_string_actions]

    def _known_choices(self) -> list[str]:
        return [
            str(choice)
            for action in self._actions
            if action.choices is not None
            for choice in action.choices
        ]

    def _subparser_choices(self) -> dict[str, argparse.ArgumentParser]:
        return next(
            (
                action.choices
                for action in self._actions
                if isinstance(action, argparse._SubParsersAction)
            ),
            {},
        )


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("mmlens")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH
        from mmlens import __version__

        return __version__


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that report a user's mistake or environment (wrong names and values, missing
    or unreadable files, a resume refused, a run directory another process holds)."""
    errors: tuple[type[BaseException], ...] = (ValueError, OSError)
    if "mmlens.experiments.integrity" in sys.modules:
        errors += (sys.modules["mmlens.experiments.integrity"].RunLocked,)
    return errors


def main(argv: list[str] | None = None) -> None:
    """The `mmlens` command; exits with `EXIT_ERROR`, `EXIT_USAGE` or `EXIT_INTERRUPTED` after
    a one-line message on stderr, or 0."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores Python's own when done
            if not args.debug:  # a warning is one line too: "mmlens: warning: ..."
                warnings.showwarning = _show_warning
            _dispatch(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        again = "; run the same command again to resume" if args.command == "run" else ""
        print(f"mmlens {args.command}: interrupted{again}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as error:
        if args.debug:
            raise
        if isinstance(error, _user_errors()):
            message = _one_line(str(error)) + _data_error_hint(args, error)
        else:
            message = (
                f"{type(error).__name__}: {_one_line(str(error))} (an unexpected error: "
                "run with --debug for the traceback and report it)"
            )
        print(f"mmlens {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None


def _data_error_hint(args: argparse.Namespace, error: Exception) -> str:
    """What to do about a malformed data row (`mmlens.data.DataError`) in `mmlens run`."""
    data = sys.modules.get("mmlens.data.sample")
    if data and isinstance(error, data.DataError) and not getattr(args, "skip_bad", True):
        return "; fix the row, or pass --skip-bad to leave such rows out (the manifest lists them)"
    return ""


def _show_warning(message: Warning | str, category: type, *args: Any, **kwargs: Any) -> None:
    print(f"mmlens: warning: {_one_line(str(message))}", file=sys.stderr)


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "demo":
        demo(args.out, args.samples, args.seed)
    elif args.command == "run":
        run_command(args)
    elif args.command == "apply-delta":
        from mmlens.models.delta import apply_delta

        print(f"wrote {apply_delta(args.base, args.delta, args.out)}")


def _build_parser() -> argparse.ArgumentParser:
    # --debug is read before or after the command (`mmlens --debug run ...`, `mmlens run ...
    # --debug`); in a subcommand its default is SUPPRESS, so as not to reset the value given
    # before it (a parser of its own: `parents` share their action objects).
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on an error, show Python's traceback instead of one line",
    )
    parser = _Parser(prog="mmlens")
    parser.add_argument("--debug", action="store_true", help=debug._actions[0].help)
    parser.add_argument("--version", action="version", version=f"mmlens {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo_parser = commands.add_parser(
        "demo", help="write the analyses report for the shipped model", parents=[debug]
    )
    demo_parser.add_argument("--out", type=Path, default=Path("mmlens-report.html"))
    demo_parser.add_argument(
        "--samples", type=int, default=28, help="VQA samples (4 per question type)"
    )
    demo_parser.add_argument("--seed", type=int, default=2026)
    run_parser = commands.add_parser(
        "run",
        parents=[debug],
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
        parents=[debug],
        help="write a release published as a delta over a base model (docs/checkpoints.md)",
        description="Write TARGET = BASE + DELTA from local folders (no download).",
    )
    delta_parser.add_argument("--base", required=True, type=Path, help="the base model's folder")
    delta_parser.add_argument("--delta", required=True, type=Path, help="the delta release")
    delta_parser.add_argument("--out", required=True, type=Path, help="where to write the model")
    return parser


if __name__ == "__main__":
    main()
