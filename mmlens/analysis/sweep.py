"""Knockout sweeps over layer windows (Cross-modal Information Flow, Figures 3–5), fast enough
for whole data sets.

A knockout whose targets begin at position t cannot change anything before t. The engine runs
the clean forward once, keeps every layer's keys and values, and recomputes only the suffix
from t, with every (flow, window centre) pair of the flows starting at t stacked in one batch:
each batch item blocks its flow's edges in its own window of layers. It gives the naive loop's numbers (one full forward
per flow and centre, as the paper's code does) within float rounding; tests check 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint

from mmlens.ablations import attention_knockout, window
from mmlens.ablations.knockout import check_rows_keep_a_key
from mmlens.ablations.positions import (
    PositionSet,
    as_positions,
    check_positions_exist,
    layer_of,
)
from mmlens.analysis.probability import answer_probability, relative_change
from mmlens.hooked_transformer import KVCache
from mmlens.hooks import has_any_hooks

Box = tuple[int, int, int, int]
PositionSpec = str | Callable[[Any], Tensor] | Tensor
PAPER_FLOWS: dict[str, tuple[PositionSpec, PositionSpec]] = {
    "Image→Last": ("image", "last"),
    "Question→Last": ("question", "last"),
    "Last→Last": ("last", "last"),
    "Image→Question": ("image", "question"),
}
"""The flows of Figures 3 and 4. Figure 5 adds ("related_patches", "question") and
("other_patches", "question"), which need each sample's boxes."""


def resolve_positions(spec: PositionSpec, inp: Any, boxes: Sequence[Box] = ()) -> Int[Tensor, "n"]:
    """Positions (item 0) that a flow's source or target names.

    A segment name (`"system"`, `"image"`, `"user"`, `"question"`, `"last"`), `"related_patches"`
    (image tokens whose patches overlap any of the sample's boxes), `"other_patches"` (the rest
    of the image tokens), a function of the input, or a tensor of positions (or a boolean mask).
    """
    if callable(spec):
        return as_positions(spec(inp))
    if isinstance(spec, Tensor):
        return as_positions(spec)
    if spec in ("related_patches", "other_patches"):
        if not boxes:
            raise ValueError(f"flow position set {spec!r} needs the sample's boxes (boxes=...)")
        related = torch.cat([inp.patches_in_box(box) for box in boxes]).unique()
        if spec == "related_patches":
            return related
        image = inp.positions("image")
        return image[~torch.isin(image, related)]
    return inp.positions(spec)


def check_no_hooks_on(model: Any) -> None:
    """The engine reuses a clean prefix; hooks already on the model would change it in ways the
    engine cannot follow (docs/analyses.md, "Knockout sweeps")."""
    if has_any_hooks(model.hook_points()):
        raise ValueError(
            "the sweep engine reuses a clean prefix, which hooks already on the model (an "
            "ablation in `with model.hooks(...)`, add_hook) would change in ways it cannot "
            "follow (pruning, attention-ranked truncation); use method='naive', which runs "
            "every variant in full under those hooks, or model.reset_hooks() first"
        )


class SweepError(ValueError):
    """A sample of a sweep could not be measured. The message names the sample (and the flow);
    `partial_result` holds the rows of the samples measured before it, as the sweep returns them.
    """

    def __init__(self, message: str, partial_result: pd.DataFrame):
        super().__init__(message)
        self.partial_result = partial_result


@dataclass
class PrefixCache:
    """A clean forward's input embeddings and per-layer keys/values, so that variants that
    change nothing before some position only recompute the suffix after it."""

    embeddings: Float[Tensor, "1 pos d_model"]
    kv_cache: KVCache
    logits: Float[Tensor, "1 pos d_vocab"]

    @classmethod
    @torch.no_grad()
    def run(cls, model: Any, inp: Any) -> PrefixCache:
        if inp.batch_size != 1 or not bool(inp.attention_mask.all()):
            raise ValueError("the sweep engine takes samples one at a time: pass batch-1 inputs")
        check_no_hooks_on(model)
        cache = KVCache.empty(model.cfg.n_layers, 1, inp.input_ids.device)
        stored: dict[str, Tensor] = {}

        def keep_embeddings(resid: Tensor, hook: HookPoint) -> None:
            stored["embeddings"] = resid

        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", keep_embeddings)]):
            logits = model(inp, past_kv_cache=cache)
        return cls(stored["embeddings"], cache, logits)

    @torch.no_grad()
    def suffix_logits(
        self, model: Any, start: int, n_variants: int, fwd_hooks: list
    ) -> Float[Tensor, "variant suffix_pos d_vocab"]:
        """Logits of positions `start..` for `n_variants` copies run with `fwd_hooks` (which see
        a batch of `n_variants`), reusing the clean keys and values of positions `< start`."""
        n_layers, n_suffix = model.cfg.n_layers, self.embeddings.shape[1] - start
        past_positions = torch.arange(start, device=self.embeddings.device).expand(n_variants, -1)
        past_is_real = torch.ones_like(past_positions, dtype=torch.bool)
        past = KVCache(
            key_values=[
                (
                    k[:, :start].expand(n_variants, -1, -1, -1),
                    v[:, :start].expand(n_variants, -1, -1, -1),
                )
                for k, v in self.kv_cache.key_values
            ],
            key_positions=[past_positions] * n_layers,  # one object: one mask for every layer
            key_is_real=[past_is_real] * n_layers,
            attention_mask=past_is_real.long(),
        )
        suffix = self.embeddings[:, start:].expand(n_variants, -1, -1)
        suffix_mask = torch.ones(n_variants, n_suffix, dtype=torch.long, device=suffix.device)
        with model.hooks(fwd_hooks=fwd_hooks):
            resid, _ = model.run_blocks(suffix, suffix_mask, past)
            return model.unembed(model.ln_final(resid))


def knockout_sweep(
    model: Any,
    inputs: Any | Sequence[Any],
    flows: dict[str, tuple[PositionSpec, PositionSpec]] | None = None,
    window_size: int = 9,
    *,
    boxes: Sequence[Sequence[Box]] | None = None,
    centres: Sequence[int] | None = None,
    batch_size: int | None = None,
    method: str = "engine",
    progress: bool = True,
) -> pd.DataFrame:
    """Relative change of the answer probability when each flow is knocked out in a window of
    layers around each centre, for every sample.

    Args:
        model: a HookedLlava (or any HookedTransformer).
        inputs: one batch-1 `MultimodalInput` or a list of them (the samples).
        flows: name -> (source, target); each a segment name, "related_patches" /
            "other_patches" (need `boxes`), a function of the input or positions.
            Default: `PAPER_FLOWS`.
        window_size: layers per window (the paper: 9), centred and clipped (`ablations.window`).
        boxes: per sample, the boxes of the objects the question is about (original pixels).
        centres: window centres (default: every layer).
        batch_size: (flow, centre) pairs per batched forward (default: all at once; lower it
            to bound memory on large models).
        method: "engine" (suffix recomputation, batched centres) or "naive" (one full forward
            per flow and centre, as the paper's code).

    Returns a DataFrame with one row per (sample, flow, centre): `sample`, `flow`, `layer` (the
    centre), `window_start`, `window_end` (exclusive), `answer_token`, `p_base`, `p_new`,
    `relative_change` (percent). `attrs` keeps the model name, flows and settings, so a
    figure can be re-drawn later (`mmlens.plot.knockout_sweep`).

    Raises:
        SweepError: a sample cannot be measured (a flow's positions are empty, outside the
            input, or leave a target without keys; no boxes for a patch flow). The message
            names the sample and the flow; `error.partial_result` holds the earlier samples'
            rows. Both methods check the same way, before running the sample.
        ValueError: `method="engine"` while hooks are on the model (use "naive").

    Example:
        >>> result = knockout_sweep(model, samples, window_size=9)
        >>> mmlens.plot.knockout_sweep(result).show()
    """
    samples = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    flows = dict(PAPER_FLOWS if flows is None else flows)
    n_layers = model.cfg.n_layers
    centres = list(range(n_layers) if centres is None else centres)
    windows = [window(centre, window_size, n_layers) for centre in centres]
    if method not in ("engine", "naive"):
        raise ValueError(f"method must be 'engine' or 'naive', got {method!r}")
    if boxes is not None and len(boxes) != len(samples):
        raise ValueError(f"{len(boxes)} box lists for {len(samples)} samples")
    if method == "engine":
        check_no_hooks_on(model)

    def attrs() -> dict[str, Any]:
        return dict(
            analysis="knockout_sweep",
            model=model.cfg.model_name,
            n_layers=n_layers,
            window_size=window_size,
            flows={name: tuple(_describe(spec) for spec in pair) for name, pair in flows.items()},
            method=method,
        )

    rows = []
    for index, inp in enumerate(tqdm(samples, desc="knockout sweep", disable=not progress)):
        try:
            positions = _flow_positions(flows, inp, boxes[index] if boxes is not None else ())
            if method == "engine":
                p_base, answer, p_new = _engine(model, inp, positions, windows, batch_size)
            else:
                p_base, answer, p_new = _naive(model, inp, positions, windows)
        except ValueError as error:
            partial = pd.DataFrame(rows)
            partial.attrs.update(attrs())
            raise SweepError(
                f"sample {index}: {error} (the {len(set(partial.get('sample', [])))} samples "
                "before it are in this error's partial_result)",
                partial,
            ) from error
        for name in flows:
            for centre, layers, probability in zip(centres, windows, p_new[name], strict=True):
                rows.append(
                    dict(
                        sample=index,
                        flow=name,
                        layer=centre,
                        window_start=layers.start,
                        window_end=layers.stop,
                        answer_token=answer,
                        p_base=p_base,
                        p_new=float(probability),
                        relative_change=float(relative_change(probability, p_base)),
                    )
                )
    result = pd.DataFrame(rows)
    result.attrs.update(attrs())
    return result


def _flow_positions(
    flows: dict[str, tuple[PositionSpec, PositionSpec]], inp: Any, boxes: Sequence[Box]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Each flow's (source, target) positions in `inp`, checked the same way for both methods:
    inside the input, and no target row left without a key."""
    n_positions = inp.input_ids.shape[1]
    positions = {}
    for name, pair in flows.items():
        try:
            source, target = (resolve_positions(spec, inp, boxes) for spec in pair)
            source_set = PositionSet.of(source, "source")
            target_set = PositionSet.of(target, "target")
            check_rows_keep_a_key(source_set, target_set)
            check_positions_exist(source_set, n_positions, "source")
            check_positions_exist(target_set, n_positions, "target")
        except (ValueError, TypeError) as error:
            raise ValueError(f"flow {name!r}: {error}") from error
        positions[name] = (source, target)
    return positions


def _engine(
    model: Any,
    inp: Any,
    positions: dict[str, tuple[Tensor, Tensor]],
    windows: list[range],
    batch_size: int | None,
) -> tuple[float, int, dict[str, list[float]]]:
    """Flows whose targets start at the same position share one batched suffix run, with one
    batch item per (flow, window): e.g. one clean forward, one run of the last position for the
    three ...→Last flows and one run from the question for Image→Question."""
    prefix = PrefixCache.run(model, inp)
    probabilities = prefix.logits[0, -1].float().softmax(-1)
    answer = int(probabilities.argmax())
    n_positions, n_layers = prefix.embeddings.shape[1], model.cfg.n_layers
    device = prefix.embeddings.device
    starts = {name: int(target.min()) for name, (_, target) in positions.items()}
    p_new: dict[str, list[float]] = {}
    for start in sorted(set(starts.values())):
        names = [name for name in positions if starts[name] == start]
        queries, keys = (
            torch.arange(start, n_positions, device=device),
            torch.arange(n_positions, device=device),
        )
        flow_edges = torch.stack(
            [
                torch.isin(queries, positions[name][1].to(device))[:, None]
                & torch.isin(keys, positions[name][0].to(device))
                for name in names
            ]
        )  # [flow, q_pos, k_pos]
        variants = [(flow, layers) for flow in range(len(names)) for layers in windows]
        chunk = batch_size or len(variants)
        group_p: list[float] = []
        for first in range(0, len(variants), chunk):
            flows, chunk_windows = zip(*variants[first : first + chunk], strict=True)
            active = active_layers(list(chunk_windows), n_layers, device)
            knock_out = _batched_knockout(flow_edges[list(flows)], active)
            logits = prefix.suffix_logits(
                model, start, len(flows), [(_is_decoder_scores, knock_out)]
            )
            group_p += logits[:, -1].float().softmax(-1)[:, answer].tolist()
        for index, name in enumerate(names):
            p_new[name] = group_p[index * len(windows) : (index + 1) * len(windows)]
    return float(probabilities[answer]), answer, {name: p_new[name] for name in positions}


@torch.no_grad()
def _naive(
    model: Any, inp: Any, positions: dict[str, tuple[Tensor, Tensor]], windows: list[range]
) -> tuple[float, int, dict[str, list[float]]]:
    base = answer_probability(model, inp)
    answer = int(base.token_ids[0])
    p_new = {
        name: [
            float(
                model.run_with_hooks(inp, fwd_hooks=attention_knockout(source, target, layers))[
                    0, -1
                ]
                .float()
                .softmax(-1)[answer]
            )
            for layers in windows
        ]
        for name, (source, target) in positions.items()
    }
    return float(base.probabilities[0]), answer, p_new


def active_layers(
    windows: list[range], n_layers: int, device: torch.device
) -> Bool[Tensor, "layer variant"]:
    """`[layer, variant]`: whether variant i's window contains the layer."""
    active = torch.zeros(n_layers, len(windows), dtype=torch.bool, device=device)
    for variant, layers in enumerate(windows):
        active[layers.start : layers.stop, variant] = True
    return active


def _batched_knockout(
    edges: Bool[Tensor, "variant q k"], active: Bool[Tensor, "layer variant"]
) -> Callable:
    """A scores hook where batch item i blocks `edges[i]` in the layers `active[:, i]`."""

    def knock_out(scores: Float[Tensor, "variant head q k"], hook: HookPoint) -> Tensor:
        blocked = active[layer_of(hook)][:, None, None, None] & edges[:, None]
        return scores.masked_fill(blocked, float("-inf"))

    return knock_out


def _is_decoder_scores(name: str) -> bool:
    return name.startswith("blocks.") and name.endswith("attn.hook_attn_scores")


def _describe(spec: PositionSpec) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Tensor):
        return f"positions {spec.tolist()}"
    return getattr(spec, "__name__", repr(spec))
