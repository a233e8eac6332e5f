"""Sequence bookkeeping of the decoder: which original positions each layer holds, the keys and
values kept between passes, and the state each block publishes to its hooks.

Every position is an index into the full input (image tokens expanded). Pruning removes rows
mid-model and a KV cache or a prefix holds earlier positions, so the tensors a hook sees need
not line up with those indices: each decoder block publishes a `SequenceState` on the context
of its hook points (`hook.ctx["sequence"]`, docs/ablations.md), and ablations read it there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mmlens.hooks import HookPoint

SEQUENCE = "sequence"
"""Key of the `SequenceState` in the context (`hook.ctx`) of every decoder-block hook point."""


@dataclass(frozen=True)
class SequenceState:
    """What one decoder block is computing, as its hooks see it.

    Attributes:
        layer: the block's index.
        query_positions: ``[batch, q_pos]`` original position of each row of the block's
            residual stream (its queries), after this block's pruning.
        key_positions: ``[batch, k_pos]`` original position of each key (earlier positions held
            from a KV cache or a prefix, then the queries).
        key_is_real: ``[batch, k_pos]`` whether each key is a real token (not padding).
        variant: for `run_suffix` runs, ``[batch, q_pos]``: which variant each row belongs to
            (each variant holds its own copy of the suffix positions, one after the other along
            the position axis, and enters at its own layer, so the rows grow from layer to
            layer); None otherwise.

    Examples:
        >>> def zero_last_row(out, hook):
        ...     state = hook.ctx["sequence"]
        ...     return out.masked_fill((state.query_positions == 40)[..., None], 0.0)
    """

    layer: int
    query_positions: Int[Tensor, "batch q_pos"]
    key_positions: Int[Tensor, "batch k_pos"]
    key_is_real: Bool[Tensor, "batch k_pos"]
    variant: Int[Tensor, "batch q_pos"] | None = None


def sequence_of(hook: HookPoint) -> SequenceState:
    """The `SequenceState` a decoder block published for this forward pass on `hook`."""
    state = hook.ctx.get(SEQUENCE)
    if state is None:
        raise ValueError(
            f"{hook.name!r} carries no sequence state: only the hook points of decoder blocks "
            "(blocks.{l}.…) know which positions they hold"
        )
    return state


@dataclass
class LayerKV:
    """One layer's rotated keys and values and the original positions they belong to."""

    keys: Float[Tensor, "batch k_pos kv_head d_head"]
    values: Float[Tensor, "batch k_pos kv_head d_head"]
    positions: Int[Tensor, "batch k_pos"]
    is_real: Bool[Tensor, "batch k_pos"]

    def extended(self, new: LayerKV) -> LayerKV:
        """These entries followed by `new` ones (the next generation step's)."""
        return LayerKV(
            torch.cat((self.keys, new.keys), dim=1),
            torch.cat((self.values, new.values), dim=1),
            torch.cat((self.positions, new.positions), dim=1),
            torch.cat((self.is_real, new.is_real), dim=1),
        )

    def before(self, start: int) -> LayerKV:
        """The entries of positions < `start` (a leading slice: positions are increasing)."""
        counts = (self.positions < start).sum(1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"batch items keep different numbers of positions before {start} "
                f"({counts.tolist()}) after pruning; run these samples one at a time"
            )
        n = int(counts[0])
        return LayerKV(
            self.keys[:, :n], self.values[:, :n], self.positions[:, :n], self.is_real[:, :n]
        )


@dataclass
class KVCache:
    """What later passes need of the positions seen so far: one `LayerKV` per layer (layers
    after a pruning point hold fewer keys) and the attention mask of every original position
    seen, which numbers the rotary positions of new tokens. `generate` creates one and each
    forward pass extends it in place."""

    layers: list[LayerKV | None]
    attention_mask: Int[Tensor, "batch seen_pos"]

    @classmethod
    def empty(cls, n_layers: int, batch: int, device: torch.device | str) -> KVCache:
        return cls([None] * n_layers, torch.zeros(batch, 0, dtype=torch.long, device=device))


@dataclass(frozen=True)
class PrefixState:
    """A pass over an input kept so that variants that change nothing before some position and
    some layer recompute only the rest (`HookedTransformer.run_prefix` / `run_suffix`).

    Attributes:
        logits: ``[batch, pos, d_vocab]``, or ``[batch, 1, d_vocab]`` (last position only), or
            None, as asked.
        resid_pre: per layer, the residual stream entering the block, ``[batch, kept, d_model]``.
        positions: per layer, the original positions of those rows.
        cache: per layer, the keys and values.
        attention_mask: ``[batch, pos]`` of the input.
        rotary_ids: ``[..., batch, pos]`` rotary position of every original position
            (`HookedTransformer.position_ids`: the last axis is the sequence).
    """

    logits: Float[Tensor, "batch logit_pos d_vocab"] | None
    resid_pre: tuple[Float[Tensor, "batch kept d_model"], ...]
    positions: tuple[Int[Tensor, "batch kept"], ...]
    cache: KVCache
    attention_mask: Int[Tensor, "batch pos"]
    rotary_ids: Int[Tensor, "... batch pos"]
    attention_groups: Int[Tensor, "batch pos"] | None = None
    """Per original position, its bidirectional attention group (-1: none), or None
    (`HookedTransformer.attention_groups`)."""

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def n_positions(self) -> int:
        return self.attention_mask.shape[1]


def group_at(
    groups: Int[Tensor, "batch n"], positions: Int[Tensor, "batch pos"]
) -> Int[Tensor, "batch pos"]:
    """The attention group of each original position (-1 for positions past `groups`, e.g.
    tokens generated after the prompt)."""
    inside = positions < groups.shape[1]
    found = groups.gather(1, positions.clamp(max=groups.shape[1] - 1))
    return torch.where(inside, found, -1)


def _together(
    query_positions: Tensor, key_positions: Tensor, groups: Tensor | None
) -> Bool[Tensor, "batch q_pos k_pos"] | None:
    """Which (query, key) pairs lie in the same bidirectional group (None: no groups)."""
    if groups is None:
        return None
    query_group = group_at(groups, query_positions)[:, :, None]
    return (query_group == group_at(groups, key_positions)[:, None, :]) & (query_group >= 0)


def causal_padding_mask(
    query_positions: Int[Tensor, "batch q_pos"],
    key_positions: Int[Tensor, "batch k_pos"],
    key_is_real: Bool[Tensor, "batch k_pos"],
    sliding_window: int | None = None,
    groups: Int[Tensor, "batch n"] | None = None,
) -> Bool[Tensor, "batch 1 q_pos k_pos"]:
    """Which keys each query may attend to, from original sequence positions.

    Causal (a key at or before the query), padding keys hidden, and a query always sees itself:
    pad queries then attend to themselves only, which keeps their unused activations finite.
    `sliding_window` (Mistral v0.1, local layers of interleaved ones) limits each query to keys less than
    `sliding_window` original positions before it: dropping tokens never widens a window.
    `groups` (``[batch, n]`` over original positions, -1 outside any group): a query also sees
    the later keys of its own group (a bidirectional block, e.g. one image's tokens); the window still
    bounds how far back it looks, as HF's ``AND(sliding, OR(causal, block))``.

    Examples:
        >>> positions = torch.arange(4)[None]
        >>> groups = torch.tensor([[-1, 0, 0, -1]])
        >>> causal_padding_mask(positions, positions, torch.ones(1, 4, dtype=torch.bool),
        ...                     groups=groups)[0, 0].int()
        tensor([[1, 0, 0, 0],
                [1, 1, 1, 0],
                [1, 1, 1, 0],
                [1, 1, 1, 1]], dtype=torch.int32)
    """
    query, key = query_positions[:, :, None], key_positions[:, None, :]
    visible = key <= query
    together = _together(query_positions, key_positions, groups)
    if together is not None:
        visible = visible | together
    allowed = visible & key_is_real[:, None, :]
    if sliding_window is not None:
        allowed &= query - key < sliding_window
    return (allowed | (key == query))[:, None]


def suffix_mask(
    query_positions: Int[Tensor, "batch q_pos"],
    query_variant: Int[Tensor, "batch q_pos"],
    key_positions: Int[Tensor, "batch k_pos"],
    key_variant: Int[Tensor, "batch k_pos"],
    key_is_real: Bool[Tensor, "batch k_pos"],
    variant_start: Int[Tensor, "variant"],
    sliding_window: int | None = None,
    groups: Int[Tensor, "batch n"] | None = None,
) -> Bool[Tensor, "batch 1 q_pos k_pos"]:
    """Which keys each row of a `run_suffix` run may attend to.

    Prefix keys (`key_variant == -1`) before the row's variant's start, and the keys of the row's
    own variant up to its position (and later ones of its bidirectional group, `groups`, as in
    `causal_padding_mask`): as in the full sequence, with every other variant's rows
    invisible. Padding keys are hidden and a row always sees itself.
    """
    query, key = query_positions[:, :, None], key_positions[:, None, :]
    start = variant_start[query_variant][:, :, None]
    from_prefix = (key_variant[:, None, :] == -1) & (key < start)
    visible = key <= query
    together = _together(query_positions, key_positions, groups)
    if together is not None:
        visible = visible | together
    own = (key_variant[:, None, :] == query_variant[:, :, None]) & visible
    allowed = (from_prefix | own) & key_is_real[:, None, :]
    if sliding_window is not None:
        allowed &= query - key < sliding_window
    return (allowed | (own & (key == query)))[:, None]


def rotary_position_ids(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Rotary positions counted from each item's first real token (as HF `generate` does), so a
    left-padded item gives the same logits as the item alone (`HookedTransformer.position_ids`,
    which every pass asks)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def survivor_index(
    positions: Int[Tensor, "batch pos"],
    kept: Int[Tensor, "batch kept_pos"],
    layer: int,
    variants: bool = False,
) -> Int[Tensor, "batch kept_pos"]:
    """Indices into the current sequence of the positions a `hook_prune` hook kept.

    With `variants` (a `run_suffix` run, where every variant holds its own copy of the suffix
    positions), `kept` names positions to keep in every variant: rows whose position is in it.
    """
    if kept.ndim != 2 or kept.shape[0] != positions.shape[0]:
        raise ValueError(
            f"blocks.{layer}.hook_prune must return [batch, kept_pos] positions, got shape "
            f"{tuple(kept.shape)} for a batch of {positions.shape[0]}; keep the same number "
            "of positions in every batch item"
        )
    if variants:
        keep = torch.stack([torch.isin(row, k) for row, k in zip(positions, kept, strict=True)])
        counts = keep.sum(1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"blocks.{layer}.hook_prune would keep different numbers of rows per batch item "
                f"({counts.tolist()})"
            )
        return keep.nonzero()[:, 1].view(positions.shape[0], -1)
    index = torch.searchsorted(positions.contiguous(), kept.contiguous())
    found = positions.gather(1, index.clamp(max=positions.shape[1] - 1)) == kept
    if not bool(found.all()) or bool((kept[:, 1:] <= kept[:, :-1]).any()):
        raise ValueError(
            f"blocks.{layer}.hook_prune must return an increasing subset of the positions it "
            "was given (original sequence indices)"
        )
    return index
