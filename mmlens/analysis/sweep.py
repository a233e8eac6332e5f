"""Knockout sweeps over layer windows (Cross-modal Information Flow, Figures 3–5), fast enough
for whole data sets.

A knockout whose targets begin at position t, in a window of layers starting at layer a,
changes nothing before position t nor below layer a. The engine runs each input once
(`model.run_prefix`), then one `model.run_suffix` in which every (flow, window) variant enters
at its window's first layer and recomputes only positions >= its flow's t, attending to the
prefix's keys and values of the earlier positions; all variants of a sample lie side by side in
one sequence, so one matrix product per layer serves them all. The samples of one padded batch
share these runs.
It gives the naive loop's numbers (one full forward per flow and window, as the paper's code)
within float rounding; tests check 1e-5. See docs/analyses.md, "Knockout sweeps".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mmlens.ablations import LaterRowsHook, attention_knockout, block_edges, window
from mmlens.ablations.knockout import check_rows_keep_a_key
from mmlens.ablations.positions import PositionSet, as_positions, check_positions_exist
from mmlens.analysis.probability import relative_change
from mmlens.hooks import HookPoint, original_hook
from mmlens.inputs import input_settings
from mmlens.sequence import sequence_of

Box = tuple[int, int, int, int]
PositionSpec = str | Callable[[Any, int], Tensor] | Tensor
PAPER_FLOWS: dict[str, tuple[PositionSpec, PositionSpec]] = {
    "Image→Last": ("image", "last"),
    "Question→Last": ("question", "last"),
    "Last→Last": ("last", "last"),
    "Image→Question": ("image", "question"),
}
"""The flows of Figures 3 and 4."""
PATCH_FLOWS: dict[str, tuple[PositionSpec, PositionSpec]] = {
    "Related patches→Question": ("related_patches", "question"),
    "Other patches→Question": ("other_patches", "question"),
}
"""The flows of Figure 5, which need each sample's boxes."""


def resolve_positions(
    spec: PositionSpec,
    inp: Any,
    boxes: Sequence[Box] = (),
    item: int = 0,
    patch_rule: str = "geometric",
) -> Int[Tensor, "n"]:
    """Positions in batch item `item` that a flow's source or target names.

    A segment name (`"system"`, `"image"`, `"user"`, `"question"`, `"last"`), `"related_patches"`
    (image tokens whose patches overlap any of the sample's boxes, by `patches_in_box`'s
    `patch_rule`), `"other_patches"` (the rest of the image tokens), a function `fn(inp, item)`,
    or a tensor of positions (or a boolean mask).
    """
    if callable(spec):
        spec = spec(inp, item)
    if isinstance(spec, Tensor):
        n_positions = inp.input_ids.shape[1]
        if spec.dtype == torch.bool and spec.shape[-1] != n_positions:
            raise ValueError(
                f"a boolean mask of length {spec.shape[-1]} for an input of {n_positions} "
                "positions; a mask has one entry per position (e.g. inp.input_ids[0] == token_id)"
            )
        return as_positions(spec)
    if spec in ("related_patches", "other_patches"):
        if not boxes:
            raise ValueError(f"flow position set {spec!r} needs the sample's boxes (boxes=...)")
        images = [index for index, owner in enumerate(inp.image_items) if owner == item]
        if len(images) != 1:
            raise ValueError(f"{spec!r} needs exactly one image in the sample, not {len(images)}")
        related = torch.cat(
            [inp.patches_in_box(box, image=images[0], rule=patch_rule) for box in boxes]
        ).unique()
        if spec == "related_patches":
            return related
        image = inp.positions("image", item)
        return image[~torch.isin(image, related)]
    return inp.positions(spec, item)


def later_rows_layer(model: Any) -> int | None:
    """The lowest layer at which a hook on the model decides something for earlier positions
    from later rows (a `LaterRowsHook`, as attention-ranked truncation's: `fastv`,
    `truncate_image_tokens`), or None.

    A variant that changes rows at or below that layer changes what the whole sequence keeps,
    so the prefix cannot be reused for it (docs/analyses.md, "Knockout sweeps")."""
    layers = [
        hook.reads_later_rows_at
        for point in model.hook_dict.values()
        for handle in point.fwd_hooks
        if isinstance(hook := original_hook(handle), LaterRowsHook)
    ]
    return min(layers, default=None)


class SweepError(ValueError):
    """A sample of a sweep could not be measured. The message names the sample (and the flow);
    `partial_result` holds the rows of the samples measured before it, as the sweep returns them.
    """

    def __init__(self, message: str, partial_result: pd.DataFrame):
        super().__init__(message)
        self.partial_result = partial_result


def knockout_sweep(
    model: Any,
    inputs: Any | Sequence[Any],
    flows: dict[str, tuple[PositionSpec, PositionSpec]] | None = None,
    window_size: int | None = None,
    *,
    boxes: Sequence[Sequence[Box]] | None = None,
    preset: Any = None,
    patch_rule: str | None = None,
    centres: Sequence[int] | None = None,
    batch_size: int | None = None,
    method: str = "engine",
    progress: bool = True,
) -> pd.DataFrame:
    """Relative change of the answer probability when each flow is knocked out in a window of
    layers around each centre, for every sample.

    Args:
        model: a HookedLlava (or any HookedTransformer).
        inputs: a `MultimodalInput` or a list of them; every batch item is a sample (a padded
            batch of several samples runs through the engine together).
        flows: name -> (source, target); each a segment name, "related_patches" /
            "other_patches" (need `boxes`), a function `fn(inp, item)` or positions.
            Default: the preset's, else `PAPER_FLOWS`.
        window_size: layers per window, centred and clipped (`ablations.window`). Default:
            the preset's window for this model, else 9 (the paper's text).
        boxes: per sample, the boxes of the objects the question is about (original pixels).
        preset: a paper preset (`mmlens.presets`): every input must have been prepared with
            it; it supplies the flows, window and patch rule not given here.
        patch_rule: `patches_in_box` rule of the patch flows (default: the preset's for this
            model, `Preset.patch_rule_for`, whose reason `attrs["patch_rule_note"]` keeps where
            it is not the preset's own; else "geometric").
        centres: window centres (default: every layer).
        batch_size: (flow, centre) variants per suffix run (default: all of a target start at
            once; lower it to bound memory on large models).
        method: "engine" (prefix reuse, batched variants) or "naive" (one full forward per
            flow and centre, as the paper's code).

    Returns a DataFrame with one row per (sample, flow, centre): `sample`, `flow`, `layer` (the
    centre), `window_start`, `window_end` (exclusive), `answer_token`, `p_base`, `p_new`,
    `relative_change` (percent). `attrs` keeps the model name, flows, settings, the preset's
    name and the inputs' settings (`input_settings`), so a figure can be re-drawn later
    (`mmlens.plot.knockout_sweep`).

    Raises:
        SweepError: a sample cannot be measured (a flow's positions are empty, outside the
            input, or leave a target without keys; no boxes for a patch flow). The message
            names the sample and the flow; `error.partial_result` holds the rows of the
            batches measured before it. Both methods check the same way, before running.

    Examples:
        >>> from mmlens.zoo.shapes import generate
        >>> samples = generate(14, seed=1)
        >>> inputs = [model.prepare(s.image, s.question) for s in samples]
        >>> result = knockout_sweep(model, inputs, window_size=3, progress=False)
        >>> result.groupby("flow").relative_change.min().round()     # the largest drop, percent
        flow
        Image→Last       -100.0
        Image→Question     -1.0
        Last→Last          -0.0
        Question→Last    -100.0
        Name: relative_change, dtype: float64
        >>> figure = mmlens.plot.knockout_sweep(result)     # figure.show() in a notebook
    """
    batches = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    patch_rule_note = None
    n_samples = sum(inp.batch_size for inp in batches)
    if preset is not None:
        for inp in batches:
            preset.check_input(model, inp)
        flows = preset.flows if flows is None else flows
        window_size = preset.window_size(model) if window_size is None else window_size
        if patch_rule is None:
            patch_rule, patch_rule_note = preset.patch_rule_for(model)
    flows = dict(PAPER_FLOWS if flows is None else flows)
    window_size = 9 if window_size is None else window_size
    patch_rule = patch_rule or "geometric"
    n_layers = model.cfg.n_layers
    centres = list(range(n_layers) if centres is None else centres)
    windows = [window(centre, window_size, n_layers) for centre in centres]
    if method not in ("engine", "naive"):
        raise ValueError(f"method must be 'engine' or 'naive', got {method!r}")
    if boxes is not None and len(boxes) != n_samples:
        raise ValueError(f"{len(boxes)} box lists for {n_samples} samples")

    def frame(rows: list[dict]) -> pd.DataFrame:
        result = pd.DataFrame(rows)
        result.attrs.update(
            analysis="knockout_sweep",
            model=model.cfg.model_name,
            n_layers=n_layers,
            window_size=window_size,
            flows={name: tuple(_describe(spec) for spec in pair) for name, pair in flows.items()},
            method=method,
            patch_rule=patch_rule,
            **({"patch_rule_note": patch_rule_note} if patch_rule_note else {}),
            preset=None if preset is None else preset.name,
            inputs=input_settings(batches),
        )
        return result

    rows: list[dict] = []
    first_sample = 0
    for inp in tqdm(batches, desc="knockout sweep", disable=not progress):
        samples = range(first_sample, first_sample + inp.batch_size)
        try:
            positions = [
                _flow_positions(
                    flows, inp, boxes[sample] if boxes is not None else (), item, patch_rule
                )
                for item, sample in enumerate(samples)
            ]
            run = _engine if method == "engine" else _naive
            with torch.no_grad():
                p_base, answers, p_new = run(model, inp, positions, windows, batch_size)
        except ValueError as error:
            # `_flow_positions` names the batch item; the message names the sample.
            where = f"sample {samples.start}" if len(samples) == 1 else f"samples {samples}"
            message = str(error)
            if message.startswith("item "):
                item, _, message = message.partition(": ")
                where = f"sample {samples.start + int(item.split()[1])}"
            raise SweepError(
                f"{where}: {message} (the {first_sample} samples before are in this error's "
                "partial_result)",
                frame(rows),
            ) from error
        for item, sample in enumerate(samples):
            for flow_index, name in enumerate(flows):
                for window_index, (centre, layers) in enumerate(zip(centres, windows, strict=True)):
                    probability = float(p_new[item, flow_index, window_index])
                    base = float(p_base[item])
                    rows.append(
                        dict(
                            sample=sample,
                            flow=name,
                            layer=centre,
                            window_start=layers.start,
                            window_end=layers.stop,
                            answer_token=int(answers[item]),
                            p_base=base,
                            p_new=probability,
                            relative_change=float(relative_change(probability, base)),
                        )
                    )
        first_sample += inp.batch_size
    return frame(rows)


def _flow_positions(
    flows: dict[str, tuple[PositionSpec, PositionSpec]],
    inp: Any,
    boxes: Sequence[Box],
    item: int,
    patch_rule: str,
) -> list[tuple[Tensor, Tensor]]:
    """Each flow's (source, target) positions in item `item`, checked the same way for both
    methods: inside the input, and no target row left without a key."""
    n_positions = inp.input_ids.shape[1]
    positions = []
    for name, pair in flows.items():
        try:
            source, target = (
                _resolved(role, spec, inp, boxes, item, patch_rule)
                for role, spec in zip(("source", "target"), pair, strict=True)
            )
            source_set = PositionSet.of(source, "source")
            target_set = PositionSet.of(target, "target")
            check_rows_keep_a_key(source_set, target_set)
            check_positions_exist(source_set, n_positions, "source")
            check_positions_exist(target_set, n_positions, "target")
        except (ValueError, TypeError) as error:
            raise ValueError(f"item {item}: flow {name!r}: {error}") from error
        positions.append((source, target))
    return positions


def _resolved(role: str, spec: Any, inp: Any, boxes: Any, item: int, patch_rule: str) -> Tensor:
    """`resolve_positions`, its error naming the flow's `role` (source or target)."""
    try:
        return resolve_positions(spec, inp, boxes, item, patch_rule)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{role}: {error}") from error


def _engine(
    model: Any,
    inp: Any,
    positions: list[list[tuple[Tensor, Tensor]]],
    windows: list[range],
    batch_size: int | None,
) -> tuple[Float[Tensor, "item"], Int[Tensor, "item"], Float[Tensor, "item flow window"]]:
    """One prefix run of the batch, then one suffix run (or `batch_size` chunks) of every
    (flow, window) variant: each recomputes from its flow's first target position and its
    window's first layer, all of them side by side in one sequence per sample."""
    prefix = model.run_prefix(inp, logits="last")
    probabilities = prefix.logits[:, 0].float().softmax(-1)
    answers = probabilities.argmax(-1)
    p_base = probabilities.gather(1, answers[:, None])[:, 0]
    n_items, n_flows, n_positions = inp.batch_size, len(positions[0]), inp.input_ids.shape[1]
    members = {
        side: _members([[pair[index] for pair in item] for item in positions], n_positions)
        for index, side in enumerate(("source", "target"))
    }  # [item, flow, pos]
    # Targets begin at the same column for every item (left padding aligns the ends).
    starts = [
        min(int(positions[item][flow][1].min()) for item in range(n_items))
        for flow in range(n_flows)
    ]
    variants = [(flow, index) for flow in range(n_flows) for index in range(len(windows))]
    # Under attention-ranked truncation, a variant whose window starts at or below the ranking
    # layer changes what the whole sequence keeps: it runs in full, after the suffix runs (which
    # read the prefix run's choice of kept positions).
    ranked = later_rows_layer(model)
    in_full = [v for v in variants if ranked is not None and windows[v[1]].start <= ranked]
    variants = [v for v in variants if v not in in_full]
    chunk = batch_size or max(len(variants), 1)
    p_new = torch.empty(n_items, n_flows, len(windows))
    for first in range(0, len(variants), chunk):
        part = variants[first : first + chunk]
        part_windows = [windows[index] for _, index in part]
        hooks = _batched_knockout(
            [flow for flow, _ in part], part_windows, members, model.cfg.n_layers
        )
        logits = model.run_suffix(
            prefix,
            [starts[flow] for flow, _ in part],
            n_variants=len(part),
            entry_layers=[layers.start for layers in part_windows],
            fwd_hooks=hooks,
            only_last=True,
        )
        chosen = logits.float().softmax(-1).unflatten(0, (n_items, len(part)))
        chosen = chosen.gather(2, answers[:, None, None].expand(-1, len(part), 1))[..., 0]
        for column, (flow, index) in enumerate(part):
            p_new[:, flow, index] = chosen[:, column].cpu()
    for flow, index in in_full:
        p_new[:, flow, index] = _knocked_probability(
            model, inp, positions, flow, windows[index], answers
        )
    return p_base.cpu(), answers.cpu(), p_new


def _members(per_item: list[list[Tensor]], n_positions: int) -> Bool[Tensor, "item flow pos"]:
    """Membership masks of every item's position set of every flow."""
    members = torch.zeros(len(per_item), len(per_item[0]), n_positions, dtype=torch.bool)
    for item, sets in enumerate(per_item):
        for flow, positions in enumerate(sets):
            members[item, flow, positions.cpu()] = True
    return members


def _batched_knockout(
    flows: list[int],
    windows: list[range],
    members: dict[str, Bool[Tensor, "item flow pos"]],
    n_layers: int,
) -> list[tuple[str, Callable]]:
    """Scores hooks for a suffix run where variant v blocks flow `flows[v]`'s edges in the
    layers `windows[v]`, in every item (`members`: ``[item, flow, position]``)."""
    active = active_layers(windows, n_layers)
    flow_of = torch.tensor(flows)

    def knock_out(scores: Float[Tensor, "batch head q k"], hook: HookPoint) -> Tensor | None:
        state = sequence_of(hook)
        variants = state.variant  # [batch, q]: the variant of every row
        device = scores.device
        is_active = active.to(device)[state.layer][variants]
        if not bool(is_active.any()):
            return None
        flows = flow_of.to(device)[variants]
        items = torch.arange(len(variants), device=device)[:, None].expand_as(variants)
        targets = members["target"].to(device)[items, flows, state.query_positions] & is_active
        sources = members["source"].to(device)[
            items[..., None], flows[..., None], state.key_positions[:, None, :]
        ]  # [batch, q, k]: each row's own flow's sources
        return block_edges(scores, state, targets[..., None] & sources)

    layers = sorted({layer for layers in windows for layer in layers})
    return [(f"blocks.{layer}.attn.hook_attn_scores", knock_out) for layer in layers]


def active_layers(windows: list[range], n_layers: int) -> Bool[Tensor, "layer variant"]:
    """``[layer, variant]``: whether variant v's window of layers contains the layer."""
    active = torch.zeros(n_layers, len(windows), dtype=torch.bool)
    for variant, layers in enumerate(windows):
        active[layers.start : layers.stop, variant] = True
    return active


def _naive(
    model: Any,
    inp: Any,
    positions: list[list[tuple[Tensor, Tensor]]],
    windows: list[range],
    batch_size: int | None,
) -> tuple[Float[Tensor, "item"], Int[Tensor, "item"], Float[Tensor, "item flow window"]]:
    """One full forward of the batch per flow and window, as the paper's code."""
    probabilities = model(inp)[:, -1].float().softmax(-1)
    answers = probabilities.argmax(-1)
    p_base = probabilities.gather(1, answers[:, None])[:, 0]
    p_new = torch.empty(inp.batch_size, len(positions[0]), len(windows))
    for flow in range(len(positions[0])):
        for index, layers in enumerate(windows):
            p_new[:, flow, index] = _knocked_probability(
                model, inp, positions, flow, layers, answers
            )
    return p_base.cpu(), answers.cpu(), p_new


def _knocked_probability(
    model: Any,
    inp: Any,
    positions: list[list[tuple[Tensor, Tensor]]],
    flow: int,
    layers: range,
    answers: Int[Tensor, "item"],
) -> Float[Tensor, "item"]:
    """One full forward with `flow` knocked out in `layers`: each item's answer probability."""
    sources = [item[flow][0] for item in positions]
    targets = [item[flow][1] for item in positions]
    hooks = attention_knockout(sources, targets, layers)
    knocked = model.run_with_hooks(inp, fwd_hooks=hooks)[:, -1].float().softmax(-1)
    return knocked.gather(1, answers[:, None])[:, 0].cpu()


def _describe(spec: PositionSpec) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Tensor):
        return f"positions {spec.tolist()}"
    return getattr(spec, "__name__", repr(spec))
