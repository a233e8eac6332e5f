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

AtP* (Kramár et al. 2024: attention patterns recomputed for query and key nodes, GradDrop) is
not implemented: its fixes concern query/key nodes and cancellation across layers, which these
sites (residual stream, attention and MLP outputs, head outputs before `W_O`) do not have as
nodes; asking for it is an error that says so.

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

import math
from collections.abc import Sequence
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mmlens.patching.activation import SITES, Metric, _plan, _table

METHODS = ("atp", "ig")
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
    method: Literal["atp", "ig"] = "atp",
    steps: int = 16,
    progress: bool = False,
) -> pd.DataFrame:
    """First-order estimates of `mmlens.patching.activation_patching`'s cells, every cell from
    the same gradients (the module doc gives the formula).

    Args:
        model, clean, corrupted, metric, sites, by, layers: as `activation_patching` (the metric
            must be differentiable: `logit_difference` is).
        method: ``"atp"`` (the gradient at the corrupted run) or ``"ig"`` (integrated over
            `steps` interpolated inputs).
        steps: the number of interpolation points of ``"ig"``.

    Returns:
        `activation_patching`'s table: one row per cell with `site`, `layer`, `unit`, `head`,
        `metric` (the estimate) and `normalized` ((estimate − corrupted) / (clean − corrupted));
        `attrs`: the baselines, `method`, `steps`, `unaligned`.

    Raises:
        ValueError: as `activation_patching`; an unknown method (``"atp*"`` is named as not
            implemented); ``"ig"`` on prompts whose units do not all align.
    """
    if method not in METHODS:
        note = " (AtP*'s fixes are not implemented: see the module doc)" if method == "atp*" else ""
        raise ValueError(f"method must be one of {METHODS}, got {method!r}{note}")
    if method == "ig" and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    cells, unaligned, names = _plan(model, clean, corrupted, sites, by, layers)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=names + ["hook_embed"])
        corrupted_logits, corrupted_cache = model.run_with_cache(
            corrupted, names_filter=names + ["hook_embed"]
        )
    clean_score, corrupted_score = metric(clean_logits).item(), metric(corrupted_logits).item()
    if math.isclose(clean_score, corrupted_score, rel_tol=1e-5, abs_tol=1e-6):
        raise ValueError(
            f"the metric is {clean_score:.4g} on both inputs: nothing for patching to restore"
        )
    if method == "atp":
        gradients = _gradients(model, corrupted, metric, names, embeds=None)
    else:
        if unaligned or clean.input_ids.shape != corrupted.input_ids.shape:
            raise ValueError(
                "method='ig' interpolates the input embeddings, so clean and corrupted need the "
                f"same layout; these differ ({unaligned or 'in length'}): use method='atp'"
            )
        start, end = corrupted_cache["hook_embed"], clean_cache["hook_embed"]
        gradients = {name: torch.zeros_like(corrupted_cache[name]) for name in names}
        for step in tqdm(range(steps), desc="integrated gradients", disable=not progress):
            alpha = (step + 0.5) / steps
            embeds = start + alpha * (end - start)
            for name, gradient in _gradients(model, corrupted, metric, names, embeds).items():
                gradients[name] += gradient / steps
    estimates = []
    for cell in cells:
        name = SITES[cell.site].format(layer=cell.layer)
        there, here = cell.corrupted_positions, cell.clean_positions
        index = (slice(None),) if cell.head is None else (slice(None), cell.head)
        delta = clean_cache[name][0, here][index] - corrupted_cache[name][0, there][index]
        estimates.append(float((gradients[name][0, there][index] * delta).sum()))
    return _table(
        cells, [corrupted_score + estimate for estimate in estimates], model, clean_score,
        corrupted_score, analysis="attribution_patching", by=by, method=method,
        steps=steps if method == "ig" else None, unaligned=unaligned,
    )  # fmt: skip


def _gradients(
    model: Any,
    inp: Any,
    metric: Metric,
    names: list[str],
    embeds: Float[Tensor, "1 pos d_model"] | None,
) -> dict[str, Tensor]:
    """The gradient of ``metric`` with respect to each hook point of `names` in one forward
    and backward pass of `inp`, with the first block's input replaced by `embeds` where given.
    The input embedding is made a leaf that requires grad, so every later activation has a
    graph whether or not the weights require grad."""
    captured: dict[str, Tensor] = {}

    def leaf(activation: Tensor, hook: Any) -> Tensor:
        source = activation if embeds is None else embeds.to(activation)
        return source.detach().requires_grad_()

    def capture(activation: Tensor, hook: Any) -> None:
        captured[hook.name] = activation

    hooks = [("hook_embed", leaf), *[(name, capture) for name in names]]
    with torch.enable_grad():
        score = metric(model.run_with_hooks(inp, fwd_hooks=hooks)).sum()
        gradients = torch.autograd.grad(score, [captured[name] for name in names])
    return {name: gradient.detach() for name, gradient in zip(names, gradients, strict=True)}
