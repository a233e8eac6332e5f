"""Activation patching: run a corrupted input with some activations taken from a clean one, and
measure how much of the clean behaviour each patched cell restores.

A cell is one site (`SITES`: the residual stream entering a block, an attention or MLP output,
one head's output) in one layer at one unit of positions: a prompt segment (``by="segment"``),
one position (``by="position"``), or, for heads, every aligned position. The clean and corrupted
prompts need not have the same length: positions are aligned segment by segment (system, image,
question, the text between the question and the last position, last), and a segment whose
length differs between the two (a longer question) has no counterpart and is not patched; the
result's ``attrs["unaligned"]`` names it.

A cell changes nothing below its layer and nothing before its first patched position, so the
corrupted prompt runs once (`model.run_prefix`) and every cell recomputes only its own layers
from its own first position on, the cells side by side in one suffix run (`model.run_suffix`,
`batch_size` cells at a time) that computes only the last position's logits. A whole
layer × segment sweep therefore costs two full forward passes (clean and corrupted) and a few
partial ones, not one forward pass per cell. Semantics in docs/analyses.md ("Activation
patching").

Examples:
    >>> from mmlens.zoo.shapes import counterfactual, generate
    >>> clean_sample = generate(1, seed=0)[0]                 # "Is the star blue or red?" red
    >>> corrupted_sample = counterfactual(clean_sample)       # the star painted blue: blue
    >>> clean = model.prepare(clean_sample.image, clean_sample.question)
    >>> corrupted = model.prepare(corrupted_sample.image, corrupted_sample.question)
    >>> metric = logit_difference(model, clean, "red", "blue")
    >>> result = activation_patching(model, clean, corrupted, metric, progress=False)
    >>> table = result[result.site == "resid_pre"].pivot(index="layer", columns="unit",
    ...                                                  values="normalized")
    >>> [round(float(table.loc[layer, unit]), 2) for layer, unit in [(0, "image"), (3, "last"), (5, "last")]]
    [1.0, 0.92, 0.99]
    >>> bool(table["question"].abs().max() < 0.01)     # the question carries no colour
    True

    The image carries the colour until layer 2; from then on the last position does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mmlens.analysis.probability import answer_token_ids
from mmlens.sequence import sequence_of

SITES = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "head": "blocks.{layer}.attn.hook_z",
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
}
"""Patchable sites and their hook points. ``"head"`` patches one head's `hook_z` (its output
before `W_O`), per layer × head at every aligned position; ``"q"``, ``"k"``, ``"v"`` one head's
query, key or value (before the rotary), per layer × head (key/value heads under grouped-query
attention) at every aligned position."""

HEAD_SITES = ("head", "q", "k", "v")
"""Sites patched per head rather than per unit of positions."""

UNITS = ("system", "image", "question", "between", "last")
"""The segments positions are aligned by, in prompt order: "between" is the text after the
question and before the last position (the assistant's role marker)."""

Metric = Callable[[Float[Tensor, "rows pos d_vocab"]], Float[Tensor, "rows"]]


def logit_difference(model: Any, inp: Any, correct: str, incorrect: str) -> Metric:
    """Metric: the logit of `correct`'s first token minus that of `incorrect` at the last
    position (answers tokenised as continuations of `inp`'s prompt).

    Examples:
        >>> metric = logit_difference(model, inp, "red", "blue")
        >>> metric(model(inp)).round().tolist()      # one number per row of logits
        [11.0]
    """
    correct_id = answer_token_ids(model, inp, correct)[0]
    incorrect_id = answer_token_ids(model, inp, incorrect)[0]

    def metric(logits: Float[Tensor, "rows pos d_vocab"]) -> Float[Tensor, "rows"]:
        return (logits[:, -1, correct_id] - logits[:, -1, incorrect_id]).float()

    return metric


@dataclass(frozen=True)
class _Cell:
    site: str
    layer: int
    unit: str | int
    head: int | None
    clean_positions: Int[Tensor, "n"]
    corrupted_positions: Int[Tensor, "n"]


def aligned_positions(clean: Any, corrupted: Any) -> tuple[dict[str, tuple[Tensor, Tensor]], dict]:
    """Per unit of `UNITS`, the (clean, corrupted) positions that correspond, and the units whose
    lengths differ (``{unit: (n_clean, n_corrupted)}``), which have no counterpart.

    Examples:
        >>> other = model.prepare(image, "What color is the star?")
        >>> pairs, unaligned = aligned_positions(inp, other)
        >>> [unit for unit in pairs], unaligned
        (['system', 'image', 'between', 'last'], {'question': (7, 6)})
    """
    pairs, unaligned = {}, {}
    for unit in UNITS:
        here, there = _unit_positions(clean, unit), _unit_positions(corrupted, unit)
        if len(here) != len(there):
            unaligned[unit] = (len(here), len(there))
        elif len(here):
            pairs[unit] = (here, there)
    return pairs, unaligned


def activation_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Metric,
    *,
    sites: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    by: Literal["segment", "position"] = "segment",
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Patch clean activations into the corrupted run, one cell at a time, and score each run.

    Args:
        model: a model; `clean` and `corrupted` are single prompts it prepared.
        metric: logits ``[rows, pos, d_vocab]`` -> one number per row (`logit_difference`); it
            must read the last position only (the suffix runs compute no other).
        sites: names in `SITES`.
        by: unit of positions for the non-head sites: a segment of `UNITS`, or one position.
        layers: the layers to patch (default: all).
        batch_size: cells per suffix run.

    Returns:
        One row per cell: `site`, `layer`, `unit` (a segment name, a corrupted-prompt position,
        or "all" for heads), `head` (heads only), `metric`, and `normalized` = (metric −
        corrupted) / (clean − corrupted): 0 is the corrupted run, 1 the clean one. `attrs`: the
        model name, the two baselines, `unaligned` and the number of suffix runs.

    Raises:
        ValueError: a batch of more than one prompt, an unknown site or unit, or clean and
            corrupted runs with the same metric (nothing to restore).
    """
    cells, unaligned, names = _plan(model, clean, corrupted, sites, by, layers)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=names)
        prefix = model.run_prefix(corrupted, logits="last")
    clean_score, corrupted_score = metric(clean_logits).item(), metric(prefix.logits).item()
    _check_restorable(clean_score, corrupted_score)
    scores = []
    chunks = [cells[start : start + batch_size] for start in range(0, len(cells), batch_size)]
    for chunk in tqdm(chunks, desc="activation patching", disable=not progress):
        scores.append(_run_chunk(model, prefix, chunk, clean_cache, metric))
    values = torch.cat(scores).cpu() if scores else torch.zeros(0)
    return _table(
        cells, values.tolist(), model, clean_score, corrupted_score,
        analysis="activation_patching", by=by, unaligned=unaligned, suffix_runs=len(chunks),
    )  # fmt: skip


def _check_restorable(clean_score: float, corrupted_score: float) -> None:
    if math.isclose(clean_score, corrupted_score, rel_tol=1e-5, abs_tol=1e-6):
        raise ValueError(
            f"the metric is {clean_score:.4g} on both inputs: nothing for patching to restore"
        )


def _cached_pair(
    model: Any, clean: Any, corrupted: Any, metric: Metric, names: list[str]
) -> tuple[float, float, Any, Any]:
    """Both prompts run once with `names` cached: their metrics (refused if equal: nothing to
    restore) and caches."""
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=names)
        corrupted_logits, corrupted_cache = model.run_with_cache(corrupted, names_filter=names)
    clean_score, corrupted_score = metric(clean_logits).item(), metric(corrupted_logits).item()
    _check_restorable(clean_score, corrupted_score)
    return clean_score, corrupted_score, clean_cache, corrupted_cache


def _plan(
    model: Any,
    clean: Any,
    corrupted: Any,
    sites: Sequence[str],
    by: str,
    layers: Sequence[int] | None,
) -> tuple[list[_Cell], dict, list[str]]:
    """The checked arguments of a patching call as its cells, the unaligned units and the hook
    points the cells read."""
    for name, inp in (("clean", clean), ("corrupted", corrupted)):
        if inp.batch_size != 1:
            raise ValueError(f"{name} holds {inp.batch_size} prompts; patch one pair at a time")
    unknown = [site for site in sites if site not in SITES]
    if unknown or by not in ("segment", "position"):
        raise ValueError(
            f"sites must be among {list(SITES)} (got {list(sites)}), by 'segment' or "
            f"'position' (got {by!r})"
        )
    layers = list(range(model.cfg.n_layers)) if layers is None else [int(x) for x in layers]
    pairs, unaligned = aligned_positions(clean, corrupted)
    cells = _cells(model, sites, layers, pairs, by)
    names = sorted({SITES[cell.site].format(layer=cell.layer) for cell in cells})
    return cells, unaligned, names


def _table(
    cells: list[_Cell],
    metrics: list[float],
    model: Any,
    clean_score: float,
    corrupted_score: float,
    **attrs: Any,
) -> pd.DataFrame:
    """One row per cell with its metric, normalised between the two baselines."""
    result = pd.DataFrame(
        {
            "site": [cell.site for cell in cells],
            "layer": [cell.layer for cell in cells],
            "unit": [cell.unit for cell in cells],
            "head": pd.array([cell.head for cell in cells], dtype="Int64"),
            "metric": metrics,
        }
    )
    result["normalized"] = (result.metric - corrupted_score) / (clean_score - corrupted_score)
    result.attrs = dict(
        model=str(model.cfg.model_name), clean=clean_score, corrupted=corrupted_score, **attrs
    )
    return result


def _unit_positions(inp: Any, unit: str) -> Int[Tensor, "n"]:
    if unit != "between":
        return inp.positions(unit)
    question, user, last = (inp.positions(name) for name in ("question", "user", "last"))
    return user[~torch.isin(user, torch.cat([question, last]))]


def _cells(
    model: Any, sites: Sequence[str], layers: list[int], pairs: dict, by: str
) -> list[_Cell]:
    cells = []
    all_clean = torch.cat([clean for clean, _ in pairs.values()])
    all_corrupted = torch.cat([corrupted for _, corrupted in pairs.values()])
    for site in sites:
        for layer in layers:
            if site in HEAD_SITES:
                n_heads = model.cfg.n_key_value_heads if site in ("k", "v") else model.cfg.n_heads
                for head in range(n_heads):
                    cells.append(_Cell(site, layer, "all", head, all_clean, all_corrupted))
            elif by == "segment":
                for unit, (here, there) in pairs.items():
                    cells.append(_Cell(site, layer, unit, None, here, there))
            else:
                for here, there in zip(all_clean.tolist(), all_corrupted.tolist(), strict=True):
                    position = torch.tensor([there])
                    cells.append(_Cell(site, layer, there, None, torch.tensor([here]), position))
    return cells


def _run_chunk(
    model: Any, prefix: Any, chunk: list[_Cell], clean_cache: Any, metric: Metric
) -> Float[Tensor, "rows"]:
    """One suffix run of the corrupted prompt's prefix: variant v is cell ``chunk[v]``, entering
    at the cell's layer from its first patched position on, patched there by one hook per hook
    point (each row finds its variant and position in `SequenceState`)."""
    by_hook: dict[str, list[tuple[int, _Cell]]] = {}
    for variant, cell in enumerate(chunk):
        by_hook.setdefault(SITES[cell.site].format(layer=cell.layer), []).append((variant, cell))

    def patch(activation: Tensor, hook: Any) -> Tensor:
        state = sequence_of(hook)
        source = clean_cache[hook.name][0]
        activation = activation.clone()  # the block's own tensor may be read again
        for variant, cell in by_hook[hook.name]:
            there = cell.corrupted_positions.to(activation.device)
            rows = (state.variant[0] == variant) & torch.isin(state.query_positions[0], there)
            if not rows.any():  # the final block computes the last position alone
                continue
            # each patched row's corrupted position -> the aligned clean position
            index = (state.query_positions[0][rows][:, None] == there[None]).int().argmax(1)
            here = cell.clean_positions.to(source.device)[index.to(source.device)]
            if cell.head is None:
                activation[0, rows] = source[here].to(activation.dtype)
            else:
                activation[0, rows, cell.head] = source[here, cell.head].to(activation.dtype)
        return activation

    with torch.no_grad():
        logits = model.run_suffix(
            prefix,
            [int(cell.corrupted_positions.min()) for cell in chunk],
            n_variants=len(chunk),
            entry_layers=[cell.layer for cell in chunk],
            fwd_hooks=[(name, patch) for name in by_hook],
            only_last=True,
        )
    return metric(logits[:, None])
