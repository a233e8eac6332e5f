"""Steering: add a direction to the residual stream, project it out, or clamp the stream's
component along it, at chosen layers and positions, as hook lists that compose with every
ablation (docs/analyses.md, "Steering and probes").

Positions are original sequence indices (`inp.positions("question")`, ...), read through the
block's `SequenceState`, so a steering hook keeps addressing the same tokens after pruning and
during generation; without positions it acts on every position, the generated ones included.

Examples:
    >>> from mmlens.steering import difference_of_means, steer
    >>> from mmlens.zoo.shapes import generate
    >>> red = [model.prepare(s.image, s.question) for s in generate(8, seed=5, question_types=["ChooseAttr"]) if s.answer == "red"]
    >>> other = [model.prepare(s.image, s.question) for s in generate(8, seed=5, question_types=["ChooseAttr"]) if s.answer != "red"]
    >>> direction = difference_of_means(model, red, other, layer=3)
    >>> direction.shape
    torch.Size([128])
    >>> hooks = steer(direction, layers=[3], positions=inp.positions("last"), coefficient=4.0)
    >>> model.run_with_hooks(inp, fwd_hooks=hooks).shape
    torch.Size([1, 105, 70])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mmlens.ablations.positions import (
    Hook,
    PositionSet,
    PositionsLike,
    as_layers,
    check_in_range,
)
from mmlens.sequence import sequence_of

STEERING_SITES = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
}
"""Where a direction can act: a block's hook point holding ``[batch, pos, d_model]``."""


def steer(
    direction: Float[Tensor, "d_model"],
    layers: int | Iterable[int],
    positions: PositionsLike | None = None,
    *,
    mode: Literal["add", "project_out", "clamp"] = "add",
    coefficient: float = 1.0,
    value: float = 0.0,
    site: str = "resid_post",
) -> list[Hook]:
    """Hooks that steer `site` of each of `layers` along `direction`.

    - ``mode="add"``: ``x + coefficient * direction`` (the direction as given, not normalised).
    - ``mode="project_out"``: ``x - (x · u) u`` with ``u`` the unit direction: the component
      along it removed.
    - ``mode="clamp"``: ``x + (value - x · u) u``: the component along ``u`` set to `value`.

    Args:
        direction: ``[d_model]``.
        layers: the blocks whose `site` is steered.
        positions: original sequence indices (shared, or one set per batch item); None: every
            position, generated ones included.
        site: a key of `STEERING_SITES` (default: the block's output).

    Examples:
        >>> u = torch.zeros(128); u[0] = 1.0
        >>> with model.hooks(fwd_hooks=steer(u, 2, mode="project_out")):
        ...     _, cache = model.run_with_cache(inp)
        >>> float(cache["blocks.2.hook_resid_post"][..., 0].abs().max())
        0.0
    """
    if site not in STEERING_SITES:
        raise ValueError(f"site {site!r}: use one of {sorted(STEERING_SITES)}")
    if mode not in ("add", "project_out", "clamp"):
        raise ValueError(f"mode {mode!r}: use 'add', 'project_out' or 'clamp'")
    direction = torch.as_tensor(direction).flatten()
    norm = direction.norm()
    if mode != "add" and not norm > 0:
        raise ValueError(f"mode {mode!r} needs a non-zero direction")
    position_set = None if positions is None else PositionSet.of(positions)

    def steer_hook(x: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
        if direction.shape[0] != x.shape[-1]:
            raise ValueError(
                f"the direction has {direction.shape[0]} entries; {hook.name} holds vectors of "
                f"{x.shape[-1]}"
            )
        d = direction.to(device=x.device, dtype=x.dtype)
        if mode == "add":
            change = coefficient * d.expand_as(x)
        else:
            u = d / norm.to(device=x.device, dtype=x.dtype)
            along = x @ u
            target = (
                torch.zeros_like(along) if mode == "project_out" else torch.full_like(along, value)
            )
            change = (target - along)[..., None] * u
        if position_set is not None:
            state = sequence_of(hook)
            check_in_range(position_set, state.key_positions, "positions")
            change = change * position_set.mask(state.query_positions)[..., None]
        return x + change

    return [(f"blocks.{layer}.{STEERING_SITES[site]}", steer_hook) for layer in as_layers(layers)]


def segment_means(
    model: Any,
    inputs: Sequence[Any],
    layers: Iterable[int],
    segment: str = "last",
    site: str = "resid_post",
) -> Float[Tensor, "item layer d_model"]:
    """The mean of `site` over each batch item's `segment` positions, for every item of
    `inputs` (prepared inputs, each a prompt or a padded batch), at each of `layers`.

    Examples:
        >>> segment_means(model, [inp], layers=[0, 5], segment="image").shape
        torch.Size([1, 2, 128])
    """
    layers = as_layers(layers)
    names = [f"blocks.{layer}.{STEERING_SITES[site]}" for layer in layers]
    rows = []
    for inp in inputs:
        with torch.no_grad():
            _, cache = model.run_with_cache(inp, names_filter=names)
        for item in range(inp.batch_size):
            positions = inp.positions(segment, item=item)
            if not len(positions):
                raise ValueError(f"batch item {item} has no {segment!r} positions")
            rows.append(
                torch.stack([cache[name][item, positions].float().mean(0) for name in names])
            )
    return torch.stack(rows).cpu()


def difference_of_means(
    model: Any,
    positive: Sequence[Any],
    negative: Sequence[Any],
    *,
    layer: int,
    segment: str = "last",
    site: str = "resid_post",
) -> Float[Tensor, "d_model"]:
    """The mean of `site` at `layer` over the `segment` positions of the `positive` inputs
    minus that over the `negative` ones (each item weighted equally): a steering vector.

    Examples:
        >>> difference_of_means(model, [inp], [inp], layer=2).abs().max()
        tensor(0.)
    """
    if not positive or not negative:
        raise ValueError("difference_of_means needs at least one positive and one negative input")
    plus = segment_means(model, positive, [layer], segment, site)[:, 0].mean(0)
    minus = segment_means(model, negative, [layer], segment, site)[:, 0].mean(0)
    return plus - minus
