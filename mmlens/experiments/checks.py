"""Option checks the runner makes once, before anything runs (docs/experiments.md, "What a run
guarantees"): an option that no sample could run with (an unknown flow, a window larger than
the model, a layer the model does not have) is one clear error, not one failure per sample.
What needs no model is checked before the model loads, and the layers (from the checkpoint's
config) before its weights load."""

from __future__ import annotations

from typing import Any

from mmlens.analysis import PAPER_FLOWS, PATCH_FLOWS


def check_options(
    spec: Any, preset: Any, options: dict[str, Any], given: Any = (), model: Any = None
) -> None:
    """Raise a ValueError naming the first option of `options` (for experiment `spec`) that no
    sample could run with, and what it can take. Without `model`, only what needs no model is
    checked (names and values; options still None are the model's defaults, left for later);
    with it, the layers too. A knockout window wider than the model is refused whether given
    (`given`: the option names passed) or the preset's default: every window would cover
    (nearly) every layer and every curve would come out flat."""
    name = spec.name

    def one_of(option: str, value: Any, allowed: tuple) -> None:
        if value is not None and value not in allowed:
            raise ValueError(
                f"experiment {name!r}: {option}={value!r} is not one of {', '.join(map(repr, allowed))}"
            )

    if name == "knockout":
        known = dict(preset.flows if preset else {**PAPER_FLOWS, **PATCH_FLOWS})
        if not known:
            raise ValueError(
                f"preset {preset.name!r} has no knockout flows, so the run would measure "
                "nothing; use --preset cross_modal_flow, or no preset (every flow)"
            )
        unknown = [flow for flow in options["flows"] or () if flow not in known]
        if unknown:
            raise ValueError(
                f"experiment 'knockout': unknown flow(s) {unknown}; flows"
                f"{' of preset ' + repr(preset.name) if preset else ''}: {', '.join(known)}"
            )
        one_of("patch_rule", options["patch_rule"], ("mask", "geometric"))
    elif name == "module-jaccard":
        for module in options["modules"]:
            one_of("modules", module, ("attn", "mlp"))
        if options["k"] < 1:
            raise ValueError(f"experiment {name!r}: k={options['k']!r} must be at least 1")
    elif name == "attention-share":
        one_of("heads", options["heads"], ("mean", "max"))
    elif name in ("cliff", "truncation", "fastv"):
        one_of("mode", options["mode"], ("drop", "mask"))
    if name == "truncation":
        if not options["layers"]:
            raise ValueError("experiment 'truncation' needs layers=[...] (--layers 8 or 8,12)")
        one_of("rank", options["rank"], ("last", "mean"))
        if options["keep"] < 0:
            raise ValueError(f"experiment {name!r}: keep={options['keep']!r} must be >= 0")
    if name == "fastv" and not 0 <= options["ratio"] <= 1:
        raise ValueError(f"experiment {name!r}: ratio={options['ratio']!r} must be in [0, 1]")
    if model is not None:
        check_layers(spec, model.cfg.n_layers, preset, options, given)
        if name == "sae-features":
            _check_sae(model, options["sae"])


def check_layers(
    spec: Any, n_layers: int, preset: Any, options: dict[str, Any], given: Any = ()
) -> None:
    """The options that name layers or count them, against a model's `n_layers` decoder
    layers (the runner checks them from the checkpoint's config, before the weights load)."""
    name = spec.name

    def layer_range(option: str, value: Any, low: int = 0, high: int = n_layers - 1) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(
                f"experiment {name!r}: {option}={value!r} is outside {low}..{high} "
                f"(the model has {n_layers} decoder layers)"
            )

    if name == "knockout":
        size = options["window_size"]
        if size > n_layers:
            origin = "" if "window_size" in given else " (the default)"
            if preset and "window_size" not in given:
                origin = f" (the default of preset {preset.name!r} for this model)"
            raise ValueError(
                f"experiment 'knockout': window_size={size}{origin} is wider than the model's "
                f"{n_layers} decoder layers, so every window covers (nearly) all of them and "
                f"every curve comes out flat; pass a narrower --window-size (window_size=), "
                f"e.g. {max(1, n_layers // 2)}"
            )
        layer_range("window_size", size, 1, n_layers)
        for centre in options["centres"] or ():
            layer_range("centres", centre)
    elif name == "module-jaccard":
        layer_range("window", options["window"], 1, n_layers)
    if name == "truncation":
        for layer in options["layers"]:
            layer_range("layers", layer)
    if name == "fastv":
        layer_range("k", options["k"], 1, n_layers - 1)


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
