"""Module knockout: zero attention or MLP outputs (Cross-modal paper, appendix D/K), or heads."""

from __future__ import annotations

from collections.abc import Iterable

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
from mmlens.hooks import HookPoint
from mmlens.sequence import sequence_of


def zero_attention(
    layers: int | Iterable[int], positions: PositionsLike | None = None
) -> list[Hook]:
    """Zero `hook_attn_out` (the whole attention sublayer's output) in `layers`, at every
    position or only at `positions` (original sequence indices).

    Examples:
        >>> logits = model.run_with_hooks(inp, fwd_hooks=zero_attention(range(2, 5)))
        >>> logits.shape
        torch.Size([1, 105, 70])
    """
    return _zero_output("hook_attn_out", layers, positions)


def zero_mlp(layers: int | Iterable[int], positions: PositionsLike | None = None) -> list[Hook]:
    """Zero `hook_mlp_out` in `layers`, at every position or only at `positions`.

    Examples:
        >>> hooks = zero_mlp(range(0, 3), positions=inp.positions("question"))
        >>> [name for name, _ in hooks]
        ['blocks.0.hook_mlp_out', 'blocks.1.hook_mlp_out', 'blocks.2.hook_mlp_out']
    """
    return _zero_output("hook_mlp_out", layers, positions)


def zero_heads(layer: int, heads: int | Iterable[int]) -> list[Hook]:
    """Zero the outputs `hook_z` of `heads` in `layer` (before the output projection).

    Examples:
        >>> logits = model.run_with_hooks(inp, fwd_hooks=zero_heads(3, [0, 2]))
        >>> zero_heads(3, 7)[0][0]
        'blocks.3.attn.hook_z'
    """
    (layer,) = as_layers(layer, "layer")
    head_index = as_layers(heads, "heads")

    def zero(z: Float[Tensor, "batch pos head d_head"], hook: HookPoint) -> Tensor:
        if max(head_index) >= z.shape[2]:
            raise ValueError(
                f"head {max(head_index)} does not exist: layer {layer} has {z.shape[2]} heads"
            )
        z = z.clone()
        z[:, :, head_index] = 0.0
        return z

    return [(f"blocks.{layer}.attn.hook_z", zero)]


def _zero_output(
    site: str, layers: int | Iterable[int], positions: PositionsLike | None
) -> list[Hook]:
    layers = as_layers(layers)
    if positions is None:
        return [
            (f"blocks.{layer}.{site}", lambda out, hook: torch.zeros_like(out)) for layer in layers
        ]
    position_set = PositionSet.of(positions)

    def zero_at_positions(out: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        state = sequence_of(hook)
        check_in_range(position_set, state.key_positions, "positions", state.query_positions)
        return out.masked_fill(position_set.mask(state.query_positions)[..., None], 0.0)

    return [(f"blocks.{layer}.{site}", zero_at_positions) for layer in layers]
