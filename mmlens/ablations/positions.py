"""Position sets in original sequence indices, and the checks ablations share.

Ablations name positions as indices into the full input (image tokens expanded). After tokens
are pruned, or with a KV cache, the tensors a hook sees no longer line up with those indices;
each decoder block publishes which original positions it holds (`mmlens.sequence.SequenceState`
on `hook.ctx["sequence"]`), and a `PositionSet` turns those into a mask.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

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

    Held as a membership mask, ``members[item, position]`` (one row: shared by every item), so
    that `mask` is one lookup whatever the number of items.
    """

    members: Bool[Tensor, "item n"]
    length: int | None = None
    """The length of the boolean mask the set was read from (None for indices): a mask has one
    entry per position of the input, which the hooks check (`check_positions_exist`)."""

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
        length = _mask_length(positions, name)
        if isinstance(positions, Tensor) and positions.dtype == torch.bool and positions.ndim == 2:
            positions = list(positions)  # a [batch, pos] mask: one set per item
        if isinstance(positions, (list, tuple)) and positions and isinstance(positions[0], Tensor):
            per_item = [
                _checked(torch.as_tensor(p), f"{name}[{i}]", allow_empty=True)
                for i, p in enumerate(positions)
            ]
            if not any(p.numel() for p in per_item):
                raise ValueError(f"{name} is empty in every batch item")
            return cls(cls.from_items(per_item).members, length)
        return cls(cls.from_items([_checked(torch.as_tensor(positions), name)]).members, length)

    @classmethod
    def from_items(cls, items: Sequence[Int[Tensor, "n"]]) -> PositionSet:
        """One set per item (a single set: shared by every item); no checks."""
        size = max((int(p.max()) + 1 for p in items if p.numel()), default=0)
        device = items[0].device if items else None
        members = torch.zeros(len(items), size, dtype=torch.bool, device=device)
        for row, positions in zip(members, items, strict=True):
            row[positions] = True
        return cls(members)

    @classmethod
    def per_batch_item(cls, inp: object, segment: str) -> PositionSet:
        """The positions of `segment` in every batch item of a `MultimodalInput`."""
        return cls.of([inp.positions(segment, item=i) for i in range(inp.batch_size)], segment)

    @property
    def is_shared(self) -> bool:
        return self.members.shape[0] == 1

    def mask(self, original: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
        """Which entries of `original` (a block's original positions) are in the set.

        A set with one row per prefix item also serves a batch with several rows per item
        (item-major, as `run_suffix` lays out its variants).
        """
        members = self.members.to(original.device)
        n_items, batch = members.shape[0], original.shape[0]
        if n_items not in (1, batch):
            if batch % n_items:
                raise ValueError(f"{n_items} per-item position sets for a batch of {batch}")
            members = members.repeat_interleave(batch // n_items, dim=0)
        if members.shape[1] == 0:
            return torch.zeros_like(original, dtype=torch.bool)
        inside = original < members.shape[1]
        found = members.expand(batch, -1).gather(1, original.clamp(max=members.shape[1] - 1))
        return found & inside

    def max(self) -> int:
        """The largest position in any item's set (-1 when every set is empty)."""
        present = self.members.any(0).nonzero()
        return int(present.max()) if present.numel() else -1

    def is_empty(self) -> bool:
        return not bool(self.members.any())

    def items(self, batch: int) -> list[Int[Tensor, "n"]]:
        """The set of every batch item."""
        rows = self.members.expand(batch, -1) if self.is_shared else self.members
        return [row.nonzero()[:, 0] for row in rows]


def _mask_length(positions: object, name: str) -> int | None:
    """The length of a boolean mask (1-D, [batch, pos], or a list of 1-D masks of one length),
    None for indices."""
    if isinstance(positions, Tensor) and positions.dtype == torch.bool and positions.ndim >= 1:
        return int(positions.shape[-1])
    if isinstance(positions, (list, tuple)) and positions and isinstance(positions[0], Tensor):
        lengths = {int(p.shape[-1]) for p in positions if p.dtype == torch.bool and p.ndim == 1}
        if len(lengths) > 1:
            raise ValueError(f"{name}: boolean masks of different lengths {sorted(lengths)}")
        return lengths.pop() if lengths else None
    return None


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


def check_in_range(
    positions: PositionSet,
    key_positions: Int[Tensor, "batch k_pos"],
    name: str,
    query_positions: Int[Tensor, "batch q_pos"] | None = None,
) -> None:
    """In a prefill (keys start at 0), every requested position must exist in the input; a
    boolean mask must have one entry per position where the block sees the whole input (its
    queries are its keys; in later generation steps it may be shorter than the keys)."""
    if int(key_positions.min()) == 0:
        whole = query_positions is not None and query_positions.shape == key_positions.shape
        check_positions_exist(positions, int(key_positions.max()) + 1, name, exact=whole)


def check_positions_exist(
    positions: PositionSet, n_positions: int, name: str, exact: bool = True
) -> None:
    """Every position must be an index into an input of `n_positions` positions, and a
    boolean mask must have `n_positions` entries (at most, unless `exact`)."""
    length = positions.length
    if length is not None and (length > n_positions or (exact and length != n_positions)):
        raise ValueError(
            f"{name} is a boolean mask of length {length}, but the input has {n_positions} "
            "positions; a mask has one entry per position (e.g. inp.input_ids[0] == token_id)"
        )
    if positions.max() >= n_positions:
        raise ValueError(
            f"{name} includes position {positions.max()}, but the input has {n_positions} "
            f"positions (0 .. {n_positions - 1})"
        )
