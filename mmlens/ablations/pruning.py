"""Token pruning: remove positions from the sequence from a layer on (the computation really
shrinks), image-token truncation ranked by attention (From Redundancy to Relevance), FastV, and
`mode="mask"` variants that hide the keys instead of removing them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from jaxtyping import Float, Int
from torch import Tensor

from mmlens.ablations.positions import (
    Hook,
    PositionSet,
    PositionsLike,
    as_layers,
    check_in_range,
    is_layer_hook,
)
from mmlens.hooks import HookPoint
from mmlens.sequence import sequence_of

Mode = Literal["drop", "mask"]


@dataclass(frozen=True, eq=False)
class LaterRowsHook:
    """A hook that decides something for earlier positions from later rows at one layer, as
    attention-ranked truncation does (`fastv`, `truncate_image_tokens`: which image tokens the
    whole sequence keeps comes from the last row's attention at `reads_later_rows_at`).

    Called as `fn(tensor, hook=hook)`. The sweep engine, which reuses a prefix, runs the
    variants that change rows at or below `reads_later_rows_at` as full forwards
    (`mmlens.analysis.sweep.later_rows_layer`, docs/analyses.md): wrap a hook of your own in
    this class when it decides things that way.

    Attributes:
        fn: the hook function.
        reads_later_rows_at: the layer whose later rows it reads.

    Examples:
        >>> def rank(pattern, hook):
        ...     return None  # choose what earlier positions keep from the last row's attention
        >>> hooks = [("blocks.2.attn.hook_pattern", LaterRowsHook(rank, reads_later_rows_at=2))]
        >>> model.run_with_hooks(inp, fwd_hooks=hooks).shape
        torch.Size([1, 105, 70])
    """

    fn: Callable[..., Tensor | None]
    reads_later_rows_at: int

    def __call__(self, tensor: Any, hook: HookPoint) -> Tensor | None:
        return self.fn(tensor, hook=hook)


def drop_tokens(positions: PositionsLike, from_layer: int, mode: Mode = "drop") -> list[Hook]:
    """Remove `positions` (original indices) from the sequence from `from_layer` on.

    `mode="drop"`: the residual stream, keys, values and the generation KV cache of later
    layers really shrink; surviving tokens keep their rotary positions; later hooks and caches
    see the shorter sequence (`blocks.{l}.hook_positions` says which original positions
    survive). Every batch item must keep the same number of positions.
    `mode="mask"`: nothing is removed; from `from_layer` on no query attends to the dropped
    keys (a dropped token still attends to itself, so its row is never empty). Same outputs at
    the surviving positions, no speed-up.

    Examples:
        >>> hooks = drop_tokens(inp.positions("image"), from_layer=3)  # appendix F: the last half
        >>> logits = model.run_with_hooks(inp, fwd_hooks=hooks)        # [batch, pos - 64, vocab]
        >>> logits.shape
        torch.Size([1, 41, 70])
    """
    position_set = PositionSet.of(positions)
    (from_layer,) = as_layers(from_layer, "from_layer")
    return _drop_hooks(lambda: position_set, from_layer, mode)


def truncate_image_tokens(
    layer: int,
    keep: int,
    rank: Literal["last", "mean"] = "last",
    *,
    image_positions: PositionsLike,
    mode: Mode = "drop",
) -> list[Hook]:
    """Keep the `keep` image tokens that receive the most attention; drop the rest from `layer` on.

    Ranking (FastV's rule): the attention pattern of layer `layer - 1`, mean over heads, of the
    last query row (`rank="last"`) or the mean over all query rows (`rank="mean"`), over each
    batch item's image positions; ties keep the earlier position. `keep=0` drops every image
    token (no ranking needed), the "information-flow cliff" scan. The ranking is made in the
    forward pass that contains the image (the prompt) and reused for later generation steps.

    Examples:
        >>> hooks = truncate_image_tokens(8, keep=64, image_positions=inp.positions("image"))
    """
    if not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be a non-negative number of image tokens, got {keep!r}")
    if keep == 0:
        return drop_tokens(image_positions, layer, mode)

    def keep_count(n_image_tokens: int) -> int:
        if keep > n_image_tokens:
            raise ValueError(f"keep={keep} but the input has only {n_image_tokens} image tokens")
        return keep

    return _truncation_hooks(layer, keep_count, rank, image_positions, mode)


def fastv(
    k: int, ratio: float, *, image_positions: PositionsLike, mode: Mode = "drop"
) -> list[Hook]:
    """FastV: from layer `k` on, keep the fraction `ratio` of image tokens that layer `k - 1`'s
    last query row attends to most (`round(ratio * n_image_tokens)` tokens per item).

    `ratio` is the *kept* fraction (docs/ablations.md); FastV's paper states its R as the pruned
    fraction, so R = 50% is `ratio=0.5` either way.

    Examples:
        >>> hooks = fastv(2, 0.5, image_positions=inp.positions("image"))
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be the kept fraction in [0, 1], got {ratio}")
    return _truncation_hooks(k, lambda n: round(ratio * n), "last", image_positions, mode)


def _truncation_hooks(
    layer: int,
    keep_count: Callable[[int], int],
    rank: str,
    image_positions: PositionsLike,
    mode: Mode,
) -> list[Hook]:
    (layer,) = as_layers(layer, "layer")
    if layer < 1:
        raise ValueError("truncation ranks by the attention of layer - 1, so layer must be >= 1")
    if rank not in ("last", "mean"):
        raise ValueError(f"rank must be 'last' or 'mean', got {rank!r}")
    images = PositionSet.of(image_positions, "image_positions")
    chosen: dict[str, PositionSet | None] = {}

    def rank_images(pattern: Float[Tensor, "batch head q_pos k_pos"], hook: HookPoint) -> None:
        state = sequence_of(hook)
        queries, keys = state.query_positions, state.key_positions
        if not bool(images.mask(queries).any()):
            return  # a generation step after the prompt: keep the prompt's choice
        check_in_range(images, keys, "image_positions")
        received = pattern.mean(1)  # [batch, q_pos, k_pos], mean over heads
        received = received[:, -1] if rank == "last" else received.mean(1)
        is_image = images.mask(keys)
        dropped = []
        for item in range(keys.shape[0]):
            image_keys = is_image[item].nonzero()[:, 0]
            order = received[item, image_keys].float().argsort(descending=True, stable=True)
            dropped.append(
                keys[item, image_keys[order[keep_count(len(image_keys)) :]]].sort().values
            )
        # Keeping every image token (fastv ratio 1.0, keep = all) drops nothing: a no-op.
        any_dropped = any(item_dropped.numel() for item_dropped in dropped)
        chosen["dropped"] = PositionSet.from_items(dropped) if any_dropped else None

    # What earlier positions keep depends on the attention of later rows at layer - 1: the
    # sweep engine runs variants that start at or below that layer in full (docs/analyses.md).
    ranking = [
        (f"blocks.{layer - 1}.attn.hook_pattern", LaterRowsHook(rank_images, layer - 1)),
    ]
    return ranking + _drop_hooks(lambda: chosen.get("dropped"), layer, mode)


def _drop_hooks(
    dropped: Callable[[], PositionSet | None], from_layer: int, mode: Mode
) -> list[Hook]:
    """Hooks removing (or masking) the positions `dropped()` names when the hooks run."""
    if mode == "drop":

        def prune(positions: Int[Tensor, "batch pos"], hook: HookPoint) -> Tensor | None:
            drop_set = dropped()
            if drop_set is None:
                return None
            check_in_range(drop_set, positions, "dropped positions")
            keep = ~drop_set.mask(positions)
            if bool(keep.all()):
                return None
            n_kept = keep.sum(1)
            if bool((n_kept != n_kept[0]).any()):
                raise ValueError(
                    f"dropping these positions would leave batch items of different lengths "
                    f"({n_kept.tolist()}); drop the same number from every item, or use mode='mask'"
                )
            if int(n_kept[0]) == 0:
                raise ValueError("dropping these positions would leave no token in the sequence")
            return positions[keep].view(positions.shape[0], -1)

        return [(f"blocks.{from_layer}.hook_prune", prune)]
    if mode != "mask":
        raise ValueError(f"mode must be 'drop' or 'mask', got {mode!r}")

    def hide_keys(scores: Float[Tensor, "batch head q_pos k_pos"], hook: HookPoint) -> Tensor:
        drop_set = dropped()
        if drop_set is None:
            return scores
        state = sequence_of(hook)
        queries, keys = state.query_positions, state.key_positions
        check_in_range(drop_set, keys, "dropped positions")
        not_self = queries[:, :, None] != keys[:, None, :]
        hidden = drop_set.mask(keys)[:, None, :] & not_self
        return scores.masked_fill(hidden[:, None], float("-inf"))

    # The first layer by name, so that a layer the model does not have is reported.
    first = (f"blocks.{from_layer}.attn.hook_attn_scores", hide_keys)
    later = (lambda name: is_layer_hook(name, "attn.hook_attn_scores", from_layer + 1), hide_keys)
    return [first, later]
