"""Option checks the runner makes once, before anything runs (docs/experiments.md, "What a run
guarantees"): an option that no sample could run with (an unknown flow, a window larger than
the model, a layer the model does not have) is one clear error, not one failure per sample."""

from __future__ import annotations

from typing import Any

from mmlens.analysis import PAPER_FLOWS, PATCH_FLOWS


def check_options(
    spec: Any, model: Any, preset: Any, options: dict[str, Any], given: Any = ()
) -> None:
    """Raise a ValueError naming the first option of `options` (resolved, for experiment
    `spec`) that `model` cannot run with, and what it can take. A knockout window larger than
    the model is refused where the user gave it (`given`: the option names passed); a preset's
    or the default window of 9 is clipped to the model's layers (`ablations.window`)."""
    n_layers = model.cfg.n_layers
    name = spec.name

    def layer_range(option: str, value: Any, low: int = 0, high: int = n_layers - 1) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(
                f"experiment {name!r}: {option}={value!r} is outside {low}..{high} "
                f"(the model has {n_layers} decoder layers)"
            )

    def one_of(option: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            raise ValueError(
                f"experiment {name!r}: {option}={value!r} is not one of {', '.join(map(repr, allowed))}"
            )

    if name == "knockout":
        known = dict(preset.flows if preset else {**PAPER_FLOWS, **PATCH_FLOWS})
        unknown = [flow for flow in options["flows"] or () if flow not in known]
        if unknown:
            raise ValueError(
                f"experiment 'knockout': unknown flow(s) {unknown}; flows"
                f"{' of preset ' + repr(preset.name) if preset else ''}: {', '.join(known)}"
            )
        if "window_size" in given:
            layer_range("window_size", options["window_size"], 1, n_layers)
        for centre in options["centres"] or ():
            layer_range("centres", centre)
        one_of("patch_rule", options["patch_rule"], ("mask", "geometric"))
    elif name == "module-jaccard":
        for module in options["modules"]:
            one_of("modules", module, ("attn", "mlp"))
        layer_range("window", options["window"], 1, n_layers)
        if options["k"] < 1:
            raise ValueError(f"experiment {name!r}: k={options['k']!r} must be at least 1")
    elif name == "attention-share":
        one_of("heads", options["heads"], ("mean", "max"))
    elif name == "sae-features":
        _check_sae(model, options["sae"])
    elif name in ("cliff", "truncation", "fastv"):
        one_of("mode", options["mode"], ("drop", "mask"))
    if name == "truncation":
        if not options["layers"]:
            raise ValueError("experiment 'truncation' needs layers=[...] (--layers 8 or 8,12)")
        for layer in options["layers"]:
            layer_range("layers", layer)
        one_of("rank", options["rank"], ("last", "mean"))
        if options["keep"] < 0:
            raise ValueError(f"experiment {name!r}: keep={options['keep']!r} must be >= 0")
    if name == "fastv":
        layer_range("k", options["k"], 1, n_layers - 1)
        if not 0 <= options["ratio"] <= 1:
            raise ValueError(f"experiment {name!r}: ratio={options['ratio']!r} must be in [0, 1]")


def _check_sae(model: Any, path: Any) -> None:
    """An SAE that loads and attaches to `model` (its hook exists and has its width)."""
    from mmlens.sae import load

    if not path:
        raise ValueError(
            "experiment 'sae-features' needs sae=PATH (--sae): a SAELens or Gemma Scope "
            "folder, or a zoo name such as 'tiny-shapes-sae'"
        )
    cfg = load(path).cfg
    if cfg.hook_name not in model.hook_dict:
        raise ValueError(
            f"experiment 'sae-features': the SAE reads {cfg.hook_name!r}: "
            f"{model._unknown_hook_message(cfg.hook_name)}"
        )
