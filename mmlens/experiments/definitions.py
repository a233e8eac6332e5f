"""The experiments `mmlens run` knows: each turns one batch of samples into tidy result rows.

An experiment is a function ``(context, samples) -> rows, tensors`` built from `mmlens.analysis`
and `mmlens.ablations`; the runner (`mmlens.experiments.run`) handles data, batching, the
correct-answer filter, storage and resumption. Every experiment and its options are documented
in docs/experiments.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmlens import metrics
from mmlens.ablations import fastv, truncate_image_tokens
from mmlens.ablations.positions import PositionSet
from mmlens.analysis import (
    PAPER_FLOWS,
    PATCH_FLOWS,
    answer_token_ids,
    answer_token_variants,
    attention_share,
    box_scores,
    correct_without_image,
    knockout_sweep,
    llava_cam,
    logit_lens,
    module_knockout_jaccard,
)
from mmlens.analysis.lens import answer_variants
from mmlens.data import Sample
from mmlens.inputs import MultimodalInput

Rows = list[dict[str, Any]]
BOX_POSITION_SETS = {"related_patches", "other_patches"}
"""Flow position sets that need each sample's boxes (`mmlens.analysis.sweep.resolve_positions`)."""


@dataclass
class Context:
    """What an experiment needs besides its samples: the model, the preset (or None), the
    resolved options, the data set's name (its metric) and generation length, and the images
    of the batch being run (read once, by sample id)."""

    model: Any
    preset: Any
    options: dict[str, Any]
    dataset: str
    max_new_tokens: int
    images: Mapping[str, Any] = field(default_factory=dict)

    def prepare(self, samples: Sequence[Sample]) -> MultimodalInput:
        """One padded `MultimodalInput` of `samples` with the preset's settings, and the data
        set's answer instruction unless the preset fixes its own."""
        kwargs: dict[str, Any] = {"preset": self.preset}
        if self.preset is None or self.preset.suffix is None:
            kwargs["suffix"] = samples[0].suffix
        return self.model.prepare(
            [self.images[sample.sample_id] for sample in samples],
            [sample.question for sample in samples],
            **kwargs,
        )


@dataclass(frozen=True)
class Experiment:
    """One experiment: its function, its options with their defaults, and whether only
    correctly answered samples enter it when the preset says so (the papers' rule for the
    interpretability analyses; benchmark scoring keeps every sample)."""

    name: str
    run: Callable[[Context, Sequence[Sample]], tuple[Rows, dict[str, torch.Tensor]]]
    options: Mapping[str, Any] = field(default_factory=dict)
    filters_correct: bool = True
    description: str = ""

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The options with defaults filled in; an unknown option is a ValueError."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ValueError(
                f"experiment {self.name!r} has no option(s) {', '.join(unknown)}; its options: "
                f"{known}"
            )
        return {**self.options, **{k: v for k, v in given.items() if v is not None}}


def _sample_columns(sample: Sample) -> dict[str, Any]:
    return {"sample_id": sample.sample_id, "question_type": sample.question_type}


def _knockout(context: Context, samples: Sequence[Sample]) -> tuple[Rows, dict]:
    """Cross-modal Figures 3-5: `knockout_sweep` over the batch. Flows that need boxes are run
    only for samples that have them, and only where image tokens are patches (not for a
    family whose image tokens are learned queries)."""
    options = context.options
    flows = dict(context.preset.flows if context.preset else {**PAPER_FLOWS, **PATCH_FLOWS})
    if options["flows"]:
        flows = {name: flows[name] for name in options["flows"]}
    needs_boxes = {name for name, pair in flows.items() if set(pair) & BOX_POSITION_SETS}
    if needs_boxes and not context.model.image_tokens_are_patches:
        if options["flows"]:
            raise ValueError(
                f"flows {sorted(needs_boxes)} need the image tokens a box covers, and this "
                "model's image tokens are not patches (they are learned queries); leave them "
                "out"
            )
        flows = {name: pair for name, pair in flows.items() if name not in needs_boxes}
    rows: Rows = []
    for with_boxes in (True, False):
        group = [sample for sample in samples if bool(sample.boxes) == with_boxes]
        group_flows = {n: f for n, f in flows.items() if with_boxes or n not in needs_boxes}
        if not group or not group_flows:
            continue
        result = knockout_sweep(
            context.model,
            context.prepare(group),
            group_flows,
            options["window_size"],
            boxes=[sample.boxes for sample in group] if with_boxes else None,
            preset=context.preset,
            patch_rule=options["patch_rule"],
            centres=options["centres"],
            progress=False,
        )
        for row in result.to_dict("records"):
            sample = group[row.pop("sample")]
            rows.append({**_sample_columns(sample), **row})
    return rows, {}


def _logit_lens(context: Context, samples: Sequence[Sample]) -> tuple[Rows, dict]:
    """Cross-modal Figure 6: the answer's first sub-word, lower-case and capitalised (`variant`;
    one token when both are the same), read off the last position after every layer."""
    inp = context.prepare(samples)
    rows: Rows = []
    for item, sample in enumerate(samples):
        single = inp.item(item)
        answer = required_answer(sample)
        tokens = answer_token_variants(context.model, single, answer)
        result = logit_lens(
            context.model,
            single,
            tokens,
            apply_final_norm=context.options["apply_final_norm"],
            preset=context.preset,
        )
        # Name the variants so that curves can be averaged over samples (Figure 6's two lines).
        names: dict[int, str] = {}
        for name, text in answer_variants(answer).items():
            names.setdefault(answer_token_ids(context.model, single, text)[0], name)
        rows += [
            {**_sample_columns(sample), "variant": names[row["token"]], **row}
            for row in result.to_dict("records")
        ]
    return rows, {}


def _module_jaccard(context: Context, samples: Sequence[Sample]) -> tuple[Rows, dict]:
    """Cross-modal appendix D: zero attention or MLP outputs over a window of layers, Jaccard
    of the question's top-k logit-lens words against the clean run."""
    inp = context.prepare(samples)
    rows: Rows = []
    for item, sample in enumerate(samples):
        for module in context.options["modules"]:
            result = module_knockout_jaccard(
                context.model,
                inp.item(item),
                module,
                window=context.options["window"],
                k=context.options["k"],
                progress=False,
            )
            rows += [{**_sample_columns(sample), **row} for row in result.to_dict("records")]
    return rows, {}


def _attention_share(context: Context, samples: Sequence[Sample]) -> tuple[Rows, dict]:
    """From Redundancy to Relevance, eq. 6-8: the last position's attention per segment."""
    inp = context.prepare(samples)
    rows: Rows = []
    for item, sample in enumerate(samples):
        result = attention_share(context.model, inp.item(item), heads=context.options["heads"])
        rows += [{**_sample_columns(sample), **row} for row in result.to_dict("records")]
    return rows, {}


def _cam(context: Context, samples: Sequence[Sample]) -> tuple[Rows, dict]:
    """LLaVA-CAM per layer: maps saved as tensors (``"<sample_id>"``: ``[layer, rows, cols]``),
    rows with each layer's mass on the sample's boxes and the pointing game."""
    inp = context.prepare(samples)
    options = context.options
    rows: Rows = []
    tensors: dict[str, torch.Tensor] = {}
    for item, sample in enumerate(samples):
        single = inp.item(item)
        cam = llava_cam(
            context.model,
            single,
            required_answer(sample),
            layers=options["layers"],
            noise_std=options["noise_std"],
            n_samples=options["n_samples"],
            progress=False,
        )
        tensors[sample.sample_id] = cam.maps
        scores = box_scores(context.model, single, sample.boxes, cam.maps) if sample.boxes else {}
        for index, layer in enumerate(cam.layers):
            rows.append(
                {
                    **_sample_columns(sample),
                    "layer": str(layer),
                    "mass_in_box": float(scores["mass_in_box"][index]) if scores else None,
                    "area_share": scores.get("area_share"),
                    "pointing_hit": float(scores["pointing_hit"][index]) if scores else None,
                }
            )
    return rows, tensors


def _cliff(context: Context, samples: Sequence[Sample]) -> tuple[Rows, dict]:
    """The information-flow cliff: is the answer still right with every image token removed
    from layer l on (l = n_layers: untouched)?"""
    inp = context.prepare(samples)
    answers = [required_answer(sample) for sample in samples]
    correct = correct_without_image(context.model, inp, answers, context.options["mode"])
    return [
        {**_sample_columns(sample), "layer": layer, "correct": bool(correct[layer, item])}
        for item, sample in enumerate(samples)
        for layer in range(correct.shape[0])
    ], {}


def _truncation(context: Context, samples: Sequence[Sample]) -> tuple[Rows, dict]:
    """From Redundancy to Relevance, Table 1: the benchmark's metric with the image tokens
    truncated from each given layer on, the `keep` most attended kept (0: all removed), and
    without truncation (`baseline`)."""
    options = context.options
    if not options["layers"]:
        raise ValueError("experiment 'truncation' needs layers=[...] (--layers 8 or 8,12)")

    def hooks(layer: int, inp: MultimodalInput) -> list:
        images = PositionSet.per_batch_item(inp, "image")
        return truncate_image_tokens(
            layer, options["keep"], options["rank"], image_positions=images, mode=options["mode"]
        )

    conditions = {f"layer {layer}": (layer, hooks) for layer in options["layers"]}
    return _generated(context, samples, conditions, dict(keep=options["keep"]))


def _fastv(context: Context, samples: Sequence[Sample]) -> tuple[Rows, dict]:
    """FastV: from layer k on, keep the fraction `ratio` of the image tokens that layer k - 1's
    last row attends to most; scored by the benchmark's metric against the baseline."""
    options = context.options

    def hooks(layer: int, inp: MultimodalInput) -> list:
        images = PositionSet.per_batch_item(inp, "image")
        return fastv(layer, options["ratio"], image_positions=images, mode=options["mode"])

    conditions = {f"fastv k={options['k']}": (options["k"], hooks)}
    return _generated(context, samples, conditions, dict(ratio=options["ratio"]))


def _generated(
    context: Context,
    samples: Sequence[Sample],
    conditions: Mapping[str, tuple[int, Callable[[int, MultimodalInput], list]]],
    extra: Mapping[str, Any],
) -> tuple[Rows, dict]:
    """Generate greedily under each condition (and without one, if `baseline`) and score each
    answer with the data set's metric (`mmlens.metrics.score_sample`)."""
    model = context.model
    inp = context.prepare(samples)
    runs: dict[str, tuple[int | None, list]] = {}
    if context.options["baseline"]:
        runs["baseline"] = (None, [])
    for name, (layer, make_hooks) in conditions.items():
        runs[name] = (layer, make_hooks(layer, inp))
    rows: Rows = []
    prompt_length = inp.input_ids.shape[1]
    for name, (layer, hooks) in runs.items():
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            tokens = model.generate(inp, max_new_tokens=context.max_new_tokens)
        for item, sample in enumerate(samples):
            prediction = model.tokenizer.decode(
                tokens[item, prompt_length:], skip_special_tokens=True
            ).strip()
            score = metrics.score_sample(context.dataset, sample, prediction)
            rows.append(
                {
                    **_sample_columns(sample),
                    "condition": name,
                    "layer": layer,
                    **extra,
                    "generated": prediction,
                    **score,
                }
            )
    return rows, {}


def _sae_features(context: Context, samples: Sequence[Sample]) -> tuple[Rows, dict]:
    """SAE feature dashboards: per sample, every feature active on its image, with its peak
    activation, the patch of the peak and its peak at the question (`mmlens.sae.feature_rows`;
    `mmlens.sae.top_activations` ranks them per feature)."""
    from mmlens.sae import feature_rows

    options = context.options
    sae = _loaded_sae(options["sae"], options["sae_fingerprint"], context.model.W_E.device)
    inp = context.prepare(samples)
    rows = feature_rows(context.model, inp, sae, [sample.sample_id for sample in samples])
    types = {sample.sample_id: sample.question_type for sample in samples}
    return [{**row, "question_type": types[row["sample_id"]]} for row in rows], {}


@functools.lru_cache(maxsize=1)
def _loaded_sae(path: str, fingerprint: str, device: torch.device) -> Any:
    """The SAE of a run, loaded once for all its batches (again if its files change: the
    fingerprint is part of the key)."""
    from mmlens.sae import load

    return load(path, device=device)


def required_answer(sample: Sample) -> str:
    """The sample's reference answer; an error naming the sample if it has none."""
    if not sample.answer:
        raise ValueError(
            f"sample {sample.sample_id!r} has no answer, which this experiment and the "
            "correct-answer filter need (correct_only=False / --all-samples skips the filter)"
        )
    return sample.answer


EXPERIMENTS: dict[str, Experiment] = {
    experiment.name: experiment
    for experiment in [
        Experiment(
            "knockout",
            _knockout,
            dict(window_size=None, centres=None, flows=None, patch_rule=None),
            description="attention knockout of the Cross-modal flows over layer windows",
        ),
        Experiment(
            "logit-lens",
            _logit_lens,
            dict(apply_final_norm=None),
            description="answer probability after every layer",
        ),
        Experiment(
            "module-jaccard",
            _module_jaccard,
            dict(modules=("attn", "mlp"), window=9, k=10),
            description="zeroing attention / MLP windows, Jaccard of top-k words",
        ),
        Experiment(
            "attention-share",
            _attention_share,
            dict(heads="mean"),
            description="attention share of system / image / user per layer",
        ),
        Experiment(
            "cam",
            _cam,
            dict(layers=None, noise_std=0.1, n_samples=16),
            description="LLaVA-CAM maps per layer (tensors) and their mass on the boxes",
        ),
        Experiment(
            "cliff",
            _cliff,
            dict(mode="drop"),
            filters_correct=False,
            description="first-token accuracy with all image tokens removed from each layer",
        ),
        Experiment(
            "truncation",
            _truncation,
            dict(layers=(), keep=0, rank="last", mode="drop", baseline=True),
            filters_correct=False,
            description="benchmark metric with image tokens truncated at given layers",
        ),
        Experiment(
            "fastv",
            _fastv,
            dict(k=2, ratio=0.5, mode="drop", baseline=True),
            filters_correct=False,
            description="benchmark metric under FastV pruning",
        ),
        Experiment(
            "sae-features",
            _sae_features,
            dict(sae=None),
            filters_correct=False,
            description="each SAE feature's peak per sample over image patches and question",
        ),
    ]
}
"""Every experiment by name (`mmlens run NAME`)."""
