"""Position sets in original sequence indices, and where they are in a (pruned) sequence.

Ablations name positions as indices into the full input (image tokens expanded). After tokens
are pruned, or with a KV cache, the tensors a hook sees no longer line up with those indices;
every decoder block therefore fires `hook_positions` (its queries' original indices) and
`hook_key_positions` (its keys'), and `SequenceView` remembers them for the hooks that follow.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

PositionsLike = Tensor | Sequence[int] | Sequence[Tensor]
Hook = tuple[str, object]


@dataclass(frozen=True)
class PositionSet:
    """Original sequence indices: one set shared by every batch item, or one set per item.

    Build with `PositionSet.of(positions)`: a 1-D tensor or list of ints applies to every
    item; a list of 1-D tensors gives each batch item its own set (e.g. from
    `[inp.positions("image", item=i) for i in range(inp.batch_size)]`). Boolean masks are read
    as masks: a 1-D mask `[pos]` selects its True positions for every item, a `[batch, pos]`
    mask (e.g. ``inp.input_ids == image_token_id``) one set per item.
    """

    shared: Int[Tensor, "n"] | None
    per_item: tuple[Int[Tensor, "n"], ...] | None = None

    @classmethod
    def of(cls, positions: PositionsLike | PositionSet, name: str = "positions") -> PositionSet:
        if isinstance(positions, PositionSet):
            return positions
        if hasattr(positions, "positions") and hasattr(positions, "batch_size"):
            raise TypeError(f"{name}: pass positions, e.g. inp.positions('image'), not the input")
        if isinstance(positions, str):
            raise TypeError(
                f"{name}: {positions!r} is a segment name, not positions; pass "
                f"inp.positions({positions!r})"
            )
        if isinstance(positions, Tensor) and positions.dtype == torch.bool and positions.ndim == 2:
            positions = list(positions)  # a [batch, pos] mask: one set per item
        if isinstance(positions, (list, tuple)) and positions and isinstance(positions[0], Tensor):
            per_item = tuple(
                _checked(torch.as_tensor(p), f"{name}[{i}]", allow_empty=True)
                for i, p in enumerate(positions)
            )
            if not any(p.numel() for p in per_item):
                raise ValueError(f"{name} is empty in every batch item")
            return cls(shared=None, per_item=per_item)
        return cls(shared=_checked(torch.as_tensor(positions), name))

    @classmethod
    def per_batch_item(cls, inp: object, segment: str) -> PositionSet:
        """The positions of `segment` in every batch item of a `MultimodalInput`."""
        return cls.of([inp.positions(segment, item=i) for i in range(inp.batch_size)], segment)

    def mask(self, original: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
        """Which entries of `original` (a block's original positions) are in the set."""
        if self.shared is not None:
            return torch.isin(original, self.shared.to(original.device))
        if len(self.per_item) != original.shape[0]:
            raise ValueError(
                f"{len(self.per_item)} per-item position sets for a batch of {original.shape[0]}"
            )
        return torch.stack(
            [
                torch.isin(row, p.to(row.device))
                for row, p in zip(original, self.per_item, strict=True)
            ]
        )

    def max(self) -> int:
        """The largest position in any item's set (-1 when every set is empty)."""
        sets = [self.shared] if self.shared is not None else self.per_item
        return max((int(p.max()) for p in sets if p.numel()), default=-1)

    def items(self, batch: int) -> list[Int[Tensor, "n"]]:
        """The set of every batch item."""
        return [self.shared] * batch if self.shared is not None else list(self.per_item)


def as_positions(positions: PositionsLike, name: str = "positions") -> Int[Tensor, "n"]:
    """Sorted, distinct positions from indices or a 1-D boolean mask (its True entries).

    >>> as_positions(torch.tensor([False, True, True, False]))
    tensor([1, 2])
    """
    if isinstance(positions, str):
        raise TypeError(
            f"{name}: {positions!r} is a segment name, not positions; pass "
            f"inp.positions({positions!r})"
        )
    return _checked(torch.as_tensor(positions), name)


def _checked(positions: Tensor, name: str, allow_empty: bool = False) -> Int[Tensor, "n"]:
    if positions.dtype == torch.bool:
        if positions.ndim != 1:
            raise ValueError(
                f"{name}: a boolean mask must be 1-D [pos] (or [batch, pos] for per-item sets), "
                f"got shape {tuple(positions.shape)}"
            )
        positions = positions.nonzero()[:, 0]
    if positions.numel() == 0:
        if allow_empty:
            return positions.long().reshape(0)
        raise ValueError(f"{name} is empty: an ablation needs at least one position")
    if positions.ndim != 1 or positions.dtype.is_floating_point:
        raise ValueError(
            f"{name} must be a 1-D set of integer positions, got shape {tuple(positions.shape)}"
        )
    if int(positions.min()) < 0:
        raise ValueError(
            f"{name} holds negative positions; use original sequence indices (0 .. pos-1)"
        )
    return positions.long().unique()


def as_layers(layers: int | Iterable[int], name: str = "layers") -> list[int]:
    """`layers` as a sorted list of distinct non-negative ints (an int is one layer)."""
    result = sorted({layers} if isinstance(layers, int) else set(layers))
    if not result:
        raise ValueError(f"{name} is empty: name at least one layer")
    if any(not isinstance(layer, int) or layer < 0 for layer in result):
        raise ValueError(f"{name} must be non-negative layer indices, got {result}")
    return result


def is_layer_hook(name: str, site: str, first_layer: int) -> bool:
    """Whether `name` is `blocks.{layer}.{site}` for a decoder layer >= `first_layer`."""
    match = re.fullmatch(rf"blocks\.(\d+)\.{re.escape(site)}", name)
    return match is not None and int(match.group(1)) >= first_layer


def layer_of(hook: HookPoint) -> int:
    """The decoder layer of a hook point named `blocks.{layer}.…`."""
    return int(re.match(r"blocks\.(\d+)\.", hook.name).group(1))


class SequenceView:
    """Remembers, per layer, the original positions of the queries and keys of the current
    forward pass, from the position hooks that fire before each block.

    Example:
        >>> view = SequenceView()
        >>> hooks = view.hooks([3, 4]) + [("blocks.3.attn.hook_attn_scores", uses_view)]
    """

    def __init__(self) -> None:
        self.queries: dict[int, Int[Tensor, "batch q_pos"]] = {}
        self.keys: dict[int, Int[Tensor, "batch k_pos"]] = {}

    def hooks(self, layers: Iterable[int]) -> list[Hook]:
        hooks: list[Hook] = []
        for layer in layers:
            hooks += [
                (f"blocks.{layer}.hook_positions", self._save_queries),
                (f"blocks.{layer}.hook_key_positions", self._save_keys),
            ]
        return hooks

    def hooks_from(self, first_layer: int) -> list[Hook]:
        """Readers for `first_layer` and every later layer (named explicitly for the first, so
        that a layer the model does not have is reported)."""
        return self.hooks([first_layer]) + [
            (
                lambda name: is_layer_hook(name, "hook_positions", first_layer + 1),
                self._save_queries,
            ),
            (
                lambda name: is_layer_hook(name, "hook_key_positions", first_layer + 1),
                self._save_keys,
            ),
        ]

    def _save_queries(self, positions: Tensor, hook: HookPoint) -> None:
        self.queries[layer_of(hook)] = positions

    def _save_keys(self, positions: Tensor, hook: HookPoint) -> None:
        self.keys[layer_of(hook)] = positions


def check_in_range(
    positions: PositionSet, key_positions: Int[Tensor, "batch k_pos"], name: str
) -> None:
    """In a prefill (keys start at 0), every requested position must exist in the input."""
    if int(key_positions.min()) == 0:
        check_positions_exist(positions, int(key_positions.max()) + 1, name)


def check_positions_exist(positions: PositionSet, n_positions: int, name: str) -> None:
    """Every position must be an index into an input of `n_positions` positions."""
    if positions.max() >= n_positions:
        raise ValueError(
            f"{name} includes position {positions.max()}, but the input has {n_positions} "
            f"positions (0 .. {n_positions - 1})"
        )
