"""Attention knockout (Cross-modal Information Flow, eq. 7) and its layer windows."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mmlens.ablations.positions import (
    Hook,
    PositionSet,
    PositionsLike,
    as_layers,
    check_in_range,
)
from mmlens.hooks import HookPoint
from mmlens.sequence import SequenceState, sequence_of


def window(center: int, size: int, n_layers: int) -> range:
    """Layers of a window of `size` centred on `center`, clipped at both ends (not shifted).

    `range(max(0, center - size // 2), min(n_layers, center + (size + 1) // 2))`

    Examples:
        >>> list(window(0, 9, 32)), list(window(16, 9, 32))
        ([0, 1, 2, 3, 4], [12, 13, 14, 15, 16, 17, 18, 19, 20])
    """
    if not 0 <= center < n_layers:
        raise ValueError(f"window centre {center} is not a layer of a {n_layers}-layer model")
    if size < 1:
        raise ValueError(f"window size must be at least 1, got {size}")
    return range(max(0, center - size // 2), min(n_layers, center + (size + 1) // 2))


def attention_knockout(
    source: PositionsLike,
    target: PositionsLike,
    layers: int | Iterable[int],
    heads: int | Iterable[int] | None = None,
) -> list[Hook]:
    """Block attention from every `target` position to every `source` position.

    Sets the pre-softmax score of each (target, source) edge to -inf in the given layers and
    heads (default: all heads); softmax renormalises over the keys left. Positions are
    original sequence indices (a set shared by the batch, or one set per item); they keep
    hitting the same tokens after pruning and during generation. A target row left with no
    visible key is an error: when the source covers every key a target can see (causally) it is
    raised here, before any forward pass; a row emptied by padding raises during the forward.

    Returns a TransformerLens hook list, so knockouts compose by concatenation.

    Examples:
        >>> layers = window(2, 3, model.cfg.n_layers)                # Figure 2's window, 3 wide
        >>> hooks = attention_knockout(inp.positions("image"), inp.positions("last"), layers)
        >>> logits = model.run_with_hooks(inp, fwd_hooks=hooks)      # [batch, pos, vocab]
        >>> logits.shape
        torch.Size([1, 105, 70])
    """
    return _knockout_hooks(source, target, layers, heads, post_softmax=False)


def attention_knockout_post_softmax(
    source: PositionsLike,
    target: PositionsLike,
    layers: int | Iterable[int],
    heads: int | Iterable[int] | None = None,
) -> list[Hook]:
    """Zero the attention *pattern* on (target, source) edges, without renormalising.

    Different from `attention_knockout`: the target rows then sum to less than 1 (the blocked
    mass is lost rather than redistributed over the other keys). A fully blocked row is
    allowed here (its attention output becomes zero).
    """
    return _knockout_hooks(source, target, layers, heads, post_softmax=True)


def _knockout_hooks(
    source: PositionsLike,
    target: PositionsLike,
    layers: int | Iterable[int],
    heads: int | Iterable[int] | None,
    post_softmax: bool,
) -> list[Hook]:
    source_set, target_set = PositionSet.of(source, "source"), PositionSet.of(target, "target")
    layers = as_layers(layers)
    head_index = None if heads is None else as_layers(heads, "heads")
    if not post_softmax:
        check_rows_keep_a_key(source_set, target_set)

    def knock_out(scores: Float[Tensor, "batch head q_pos k_pos"], hook: HookPoint) -> Tensor:
        state = sequence_of(hook)
        check_in_range(source_set, state.key_positions, "source", state.query_positions)
        check_in_range(target_set, state.key_positions, "target", state.query_positions)
        targets = target_set.mask(state.query_positions)[:, :, None]
        sources = source_set.mask(state.key_positions)[:, None, :]
        return block_edges(scores, state, targets & sources, head_index, post_softmax)

    site = "attn.hook_pattern" if post_softmax else "attn.hook_attn_scores"
    return [(f"blocks.{layer}.{site}", knock_out) for layer in layers]


def block_edges(
    scores: Float[Tensor, "batch head q_pos k_pos"],
    state: SequenceState,
    edges: Bool[Tensor, "batch q_pos k_pos"],
    heads: list[int] | None = None,
    post_softmax: bool = False,
) -> Float[Tensor, "batch head q_pos k_pos"]:
    """Block the (query row, key) `edges` of `scores` (or of a pattern, `post_softmax`).

    The one place where knockout edges are applied: by `attention_knockout` (edges from a
    target and a source set) and by the sweep engine (each variant's own edges). Scores get
    -inf in the given heads (default: all); a pattern gets 0. A score row left with no visible
    key is an error that names the position, item, head and layer.
    """
    layer = state.layer
    if heads is not None and max(heads) >= scores.shape[1]:
        raise ValueError(
            f"head {max(heads)} does not exist: layer {layer} has {scores.shape[1]} heads"
        )
    edges = edges[:, None]
    if heads is not None:
        selected_heads = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
        selected_heads[heads] = True
        edges = edges & selected_heads[None, :, None, None]
    if post_softmax:
        return scores.masked_fill(edges, 0.0)
    scores = scores.masked_fill(edges, float("-inf"))
    empty_rows = torch.isneginf(scores.amax(-1)) & edges.any(-1)
    if bool(empty_rows.any()):
        item, head, row = (int(i) for i in empty_rows.nonzero()[0])
        raise ValueError(
            f"attention knockout leaves position {int(state.query_positions[item, row])} (batch "
            f"item {item}, head {head}, layer {layer}) with no key to attend to; keep at least "
            "one visible key per target (e.g. the BOS token) or drop that target"
        )
    return scores


def check_rows_keep_a_key(source: PositionSet, target: PositionSet) -> None:
    """A target t sees keys 0..t (causal); if the source holds all of them, t's row is empty."""
    n_items = max(s.members.shape[0] for s in (source, target))
    for item, (source_item, target_item) in enumerate(
        zip(source.items(n_items), target.items(n_items), strict=True)
    ):
        if not target_item.numel():
            continue
        covered = torch.zeros(int(target_item.max()) + 1, dtype=torch.bool)
        covered[source_item[source_item < covered.numel()]] = True
        blocked = [int(t) for t in target_item if bool(covered[: int(t) + 1].all())]
        if blocked:
            raise ValueError(
                f"attention knockout blocks every key that target position {blocked[0]} "
                f"(batch item {item}) can see: positions 0..{blocked[0]} are all sources, so its "
                "attention row would be empty. Remove that target or keep a source position visible"
            )
