"""Attribution patching: the first-order estimate of every activation-patching cell from the
gradient of the metric, so that a whole layer × segment (or position, or head) table costs a
few forward and backward passes instead of one suffix run per cell.

For a cell (`mmlens.patching.activation`'s cells: a site, a layer, the aligned positions of a
unit, a head) the estimate of the patched metric is

    metric(corrupted) + sum over the cell's positions of  g · (a_clean - a_corrupted)

with `a` the site's activation (one head's slice for heads) and `g` a gradient of the metric
with respect to it:

- ``method="atp"`` (attribution patching, Nanda 2023; Syed et al. 2023): `g` at the corrupted
  run. One clean forward, one corrupted forward and one backward for every cell at once.
- ``method="ig"`` (integrated gradients, as EAP-IG: Hanna et al. 2024): `g` averaged over
  `steps` runs whose input embeddings (`hook_embed`: tokens and image features) lie on the
  straight line from the corrupted input to the clean one (midpoints). Exact where the metric is
  linear in the activation, and, summed over every position of the first block's input, equal
  to the clean-minus-corrupted metric up to the quadrature error (completeness). Needs prompts
  of the same layout (every unit aligned).

- ``method="atp*"`` (AtP*, Kramár et al. 2024): AtP with its two fixes. The QK fix: a query or
  key cell (sites ``"q"``, ``"k"``) changes its layer's attention scores, so that layer's pattern
  is recomputed exactly (the patched row or column of the scores, then the softmax) and only
  the metric's dependence on the pattern is linearised: the estimate is `g_pattern ·
  (pattern_patched - pattern_corrupted)`, which a saturated softmax no longer hides. GradDrop:
  the estimate repeated once per layer with the gradient through that layer's attention and
  MLP outputs dropped, and `magnitude` = mean over layers of the absolute estimates (sum / (L −
  1)), AtP*'s ranking score, which a cancellation between direct and indirect paths no longer
  hides. `metric` and `normalized` hold the QK-fixed estimate without GradDrop. Needs prompts
  of the same layout; L + 1 backward passes.

Examples:
    >>> from mmlens.patching import attribution_patching, logit_difference
    >>> from mmlens.zoo.shapes import counterfactual, generate
    >>> clean_sample = generate(1, seed=0)[0]
    >>> corrupted_sample = counterfactual(clean_sample)       # the star painted blue
    >>> clean = model.prepare(clean_sample.image, clean_sample.question)
    >>> corrupted = model.prepare(corrupted_sample.image, corrupted_sample.question)
    >>> metric = logit_difference(model, clean, "red", "blue")
    >>> atp = attribution_patching(model, clean, corrupted, metric)
    >>> ig = attribution_patching(model, clean, corrupted, metric, method="ig", steps=4)
    >>> def image_at_layer_0(result):
    ...     rows = result[(result.site == "resid_pre") & (result.unit == "image")]
    ...     return round(float(rows.normalized.iloc[0]), 1)
    >>> image_at_layer_0(atp), image_at_layer_0(ig)     # exact activation patching: 1.0
    (0.4, 1.0)

    AtP's linearisation through the organism's saturated attention underestimates the image's
    share at layer 0; integrated gradients recover it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import einops
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mmlens.patching.activation import SITES, Metric, _cached_pair, _plan, _table

METHODS = ("atp", "atp*", "ig")
"""The estimates `attribution_patching` computes."""


def attribution_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Metric,
    *,
    sites: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    by: Literal["segment", "position"] = "segment",
    layers: Sequence[int] | None = None,
    method: Literal["atp", "atp*", "ig"] = "atp",
    steps: int = 16,
    progress: bool = False,
) -> pd.DataFrame:
    """First-order estimates of `mmlens.patching.activation_patching`'s cells, every cell from
    the same gradients (the module doc gives the formula).

    Args:
        model, clean, corrupted, metric, sites, by, layers: as `activation_patching` (the metric
            must be differentiable: `logit_difference` is).
        method: ``"atp"`` (the gradient at the corrupted run), ``"atp*"`` (with the QK fix and
            GradDrop) or ``"ig"`` (integrated over `steps` interpolated inputs).
        steps: the number of interpolation points of ``"ig"``.

    Returns:
        `activation_patching`'s table: one row per cell with `site`, `layer`, `unit`, `head`,
        `metric` (the estimate) and `normalized` ((estimate − corrupted) / (clean − corrupted));
        with ``"atp*"`` also `magnitude` (GradDrop's score, to rank cells by); `attrs`: the
        baselines, `method`, `steps`, `unaligned`.

    Raises:
        ValueError: as `activation_patching`; an unknown method; ``"ig"`` or ``"atp*"`` on
            prompts of different layouts.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "ig" and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    cells, unaligned, names = _plan(model, clean, corrupted, sites, by, layers)
    qk_layers = sorted({cell.layer for cell in cells if cell.site in ("q", "k")})
    pattern_names = [f"blocks.{layer}.attn.hook_pattern" for layer in qk_layers]
    cached = [*names, "hook_embed"]
    if method == "atp*":
        for layer in qk_layers:
            prefix = f"blocks.{layer}.attn."
            cached += [prefix + "hook_pattern", prefix + "hook_attn_scores"]
            cached += _qk_names(model, layer)
    clean_score, corrupted_score, clean_cache, corrupted_cache = _cached_pair(
        model, clean, corrupted, metric, cached
    )
    if method != "atp" and (unaligned or clean.input_ids.shape != corrupted.input_ids.shape):
        raise ValueError(
            f"method={method!r} compares the two prompts position by position, so clean and "
            f"corrupted need the same layout; these differ ({unaligned or 'in length'}): use "
            "method='atp'"
        )
    caches = (clean_cache, corrupted_cache)
    magnitude = None
    if method == "ig":
        start, end = corrupted_cache["hook_embed"], clean_cache["hook_embed"]
        gradients = {name: torch.zeros_like(corrupted_cache[name]) for name in names}
        for step in tqdm(range(steps), desc="integrated gradients", disable=not progress):
            alpha = (step + 0.5) / steps
            embeds = start + alpha * (end - start)
            for name, gradient in _gradients(model, corrupted, metric, names, embeds).items():
                gradients[name] += gradient / steps
        estimates = _estimates(model, cells, gradients, caches, qk_fix=False)
    else:
        wanted = names + (pattern_names if method == "atp*" else [])
        gradients = _gradients(model, corrupted, metric, wanted, embeds=None)
        estimates = _estimates(model, cells, gradients, caches, qk_fix=method == "atp*")
    if method == "atp*":
        n_layers = model.cfg.n_layers
        magnitude = [0.0] * len(cells)
        for layer in tqdm(range(n_layers), desc="GradDrop", disable=not progress):
            dropped = _gradients(model, corrupted, metric, wanted, embeds=None, drop_layer=layer)
            for index, value in enumerate(_estimates(model, cells, dropped, caches, qk_fix=True)):
                magnitude[index] += abs(value) / max(n_layers - 1, 1)
    result = _table(
        cells, [corrupted_score + estimate for estimate in estimates], model, clean_score,
        corrupted_score, analysis="attribution_patching", by=by, method=method,
        steps=steps if method == "ig" else None, unaligned=unaligned,
    )  # fmt: skip
    if magnitude is not None:
        result["magnitude"] = magnitude
    return result


def _estimates(
    model: Any,
    cells: list,
    gradients: dict[str, Tensor],
    caches: tuple[Any, Any],
    qk_fix: bool,
) -> list[float]:
    """Each cell's first-order change of the metric: grad · delta over its positions, or, with
    `qk_fix`, for query and key cells the exact change of their layer's pattern weighed by the
    pattern's gradient."""
    clean_cache, corrupted_cache = caches
    estimates = []
    for cell in cells:
        if qk_fix and cell.site in ("q", "k"):
            estimates.append(_qk_fixed(model, cell, clean_cache, corrupted_cache, gradients))
            continue
        name = SITES[cell.site].format(layer=cell.layer)
        there, here = cell.corrupted_positions, cell.clean_positions
        index = (slice(None),) if cell.head is None else (slice(None), cell.head)
        delta = clean_cache[name][0, here][index] - corrupted_cache[name][0, there][index]
        estimates.append(float((gradients[name][0, there][index] * delta).sum()))
    return estimates


def _qk_names(model: Any, layer: int) -> tuple[str, str]:
    """The query and key hook points the scores are made of: after the rotary where there is
    one."""
    prefix = f"blocks.{layer}.attn."
    rotated = f"{prefix}hook_rot_q" in model.hook_dict
    return (prefix + ("hook_rot_q" if rotated else "hook_q"),
            prefix + ("hook_rot_k" if rotated else "hook_k"))  # fmt: skip


def _qk_fixed(
    model: Any, cell: Any, clean_cache: Any, corrupted_cache: Any, gradients: dict[str, Tensor]
) -> float:
    """AtP*'s QK fix for a query or key cell: the corrupted scores with the cell's rows (a
    query) or columns (a key) made from its clean value, the softmax recomputed, and the change
    of the pattern weighed by the metric's gradient with respect to the pattern."""
    attn = model.blocks[cell.layer].attn
    group = attn.n_heads // attn.n_key_value_heads
    prefix = f"blocks.{cell.layer}.attn."
    q_name, k_name = _qk_names(model, cell.layer)
    positions = cell.corrupted_positions
    if cell.site == "k":  # every query head that reads this key head
        heads = list(range(cell.head * group, (cell.head + 1) * group))
        queries = corrupted_cache[q_name][0][:, heads]
        key_change = (clean_cache[k_name][0] - corrupted_cache[k_name][0])[positions, cell.head]
        score_change = einops.einsum(queries, key_change, "q h d, n d -> h q n") * attn.scale
        scores = corrupted_cache[prefix + "hook_attn_scores"][0, heads].clone()
        scores[:, :, positions] += score_change
    else:
        heads = [cell.head]
        keys = corrupted_cache[k_name][0][:, cell.head // group]
        query_change = (clean_cache[q_name][0] - corrupted_cache[q_name][0])[positions, cell.head]
        score_change = einops.einsum(query_change, keys, "n d, k d -> n k") * attn.scale
        scores = corrupted_cache[prefix + "hook_attn_scores"][0, heads].clone()
        scores[:, positions] += score_change
    pattern = corrupted_cache[prefix + "hook_pattern"][0, heads]
    change = torch.softmax(scores.float(), dim=-1) - pattern.float()
    return float((gradients[prefix + "hook_pattern"][0, heads].float() * change).sum())


def _gradients(
    model: Any,
    inp: Any,
    metric: Metric,
    names: list[str],
    embeds: Float[Tensor, "1 pos d_model"] | None,
    drop_layer: int | None = None,
) -> dict[str, Tensor]:
    """The gradient of ``metric`` with respect to each hook point of `names` in one forward
    and backward pass of `inp`, with the first block's input replaced by `embeds` where given,
    and with `drop_layer`'s attention and MLP outputs cut from the graph (GradDrop: no gradient
    flows back through that layer's contributions; hook points that only reach the metric
    through them get zeros). The input embedding is made a leaf that requires grad, so every
    later activation has a graph whether or not the weights require grad."""
    captured: dict[str, Tensor] = {}

    def leaf(activation: Tensor, hook: Any) -> Tensor:
        source = activation if embeds is None else embeds.to(activation)
        return source.detach().requires_grad_()

    def capture(activation: Tensor, hook: Any) -> None:
        captured[hook.name] = activation

    def drop(activation: Tensor, hook: Any) -> Tensor:
        return activation.detach()

    hooks = [("hook_embed", leaf), *[(name, capture) for name in names]]
    if drop_layer is not None:
        hooks += [
            (f"blocks.{drop_layer}.{point}", drop) for point in ("hook_attn_out", "hook_mlp_out")
        ]
    with torch.enable_grad():
        score = metric(model.run_with_hooks(inp, fwd_hooks=hooks)).sum()
        gradients = torch.autograd.grad(
            score, [captured[name] for name in names], allow_unused=True
        )
    return {
        name: torch.zeros_like(captured[name]) if gradient is None else gradient.detach()
        for name, gradient in zip(names, gradients, strict=True)
    }
