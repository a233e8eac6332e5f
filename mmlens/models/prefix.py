"""Prefix and suffix runs of `HookedTransformer` (`run_prefix`, `run_suffix`), and `_Rows`,
the rows a decoder pass computes, which every pass (`forward` too) updates block by block.

A prefix run keeps every layer's entering residual stream, keys and values; a suffix run
recomputes, for several variants at once, the positions from some start on and from some layer
on, reading the rest from the prefix (docs/analyses.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from jaxtyping import Float, Int

from mmlens.sequence import KVCache, LayerKV, PrefixState, SequenceState


class PrefixRuns:
    """`run_prefix` and `run_suffix`, inherited by `HookedTransformer`: they drive the model's
    own `model_inputs`, `embed_input`, `position_ids`, `_run_decoder`, `_run_block`,
    `to_logits` and `hooks`."""

    def run_prefix(
        self,
        input: Any = None,
        *,
        logits: Literal["all", "last"] | None = "all",
        **kwargs: Any,
    ) -> PrefixState:
        """Run `input` once and keep what later variants of it can reuse (`run_suffix`).

        Hooks active on the model (`with model.hooks(...)`) apply, as in a forward pass. Keeps
        every layer's entering residual stream, keys and values; `logits` says which logits
        to compute ("all", "last" position only, or None). With "last", the final block computes
        only the last position's output: its hooks from `attn.hook_q` on see that row alone
        (`hook.ctx["sequence"].query_positions`), the ones before it every row.

        Examples:
            >>> prefix = model.run_prefix(inp)
            >>> prefix.logits.shape   # [batch, pos, d_vocab]
            torch.Size([1, 105, 70])
        """
        inputs = self.model_inputs(input, **kwargs)
        input_ids = inputs.pop("input_ids")
        attention_mask = inputs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_inputs = {k: v for k, v in inputs.items() if v is not None}
        resid = self.embed_input(input_ids, **image_inputs)
        cache = KVCache.empty(self.cfg.n_layers, input_ids.shape[0], input_ids.device)
        record: list = []
        id_inputs = {"input_ids": input_ids, **image_inputs}
        resid, _ = self._run_decoder(
            resid,
            attention_mask,
            cache,
            record=record,
            last_only=logits == "last",
            inputs=id_inputs,
        )
        groups = self.attention_groups(**id_inputs)
        return PrefixState(
            logits=None if logits is None else self.to_logits(resid),
            resid_pre=tuple(entering for entering, _ in record),
            positions=tuple(positions for _, positions in record),
            cache=cache,
            attention_mask=attention_mask,
            rotary_ids=self.position_ids(attention_mask, **id_inputs),
            attention_groups=groups if groups is not None and bool((groups >= 0).any()) else None,
        )

    def run_suffix(
        self,
        prefix: PrefixState,
        start: int | list[int],
        *,
        n_variants: int = 1,
        entry_layers: list[int] | None = None,
        fwd_hooks: list | tuple = (),
        only_last: bool = False,
    ) -> Float[torch.Tensor, "variant_rows suffix_pos d_vocab"]:
        """Logits of `n_variants` variants of every prefix item, each recomputing the positions
        from its `start` on, from its entry layer on, with `fwd_hooks`; the prefix gives the rest.

        Exact for variants that change nothing before their start position nor below their
        entry layer (e.g. an attention knockout whose targets begin at the start, in a window of
        layers that begins at the entry layer): there, every variant equals the prefix run. A
        variant enters at its layer with the prefix's residual stream at its positions, and
        attends to the prefix's keys and values before its start and to its own rows.

        All variants of an item run as one sequence: each holds its own copy of its positions,
        one variant after the other along the position axis (the prefix's keys are read once, and
        one matrix product serves every variant). Hooks see those rows, growing from layer to
        layer as variants enter; `hook.ctx["sequence"].variant` (``[batch, pos]``) says which
        variant each row belongs to. Hooks already on the model apply too, as in the prefix run,
        and must not let earlier positions depend on later ones (a causal model never does).

        Args:
            prefix: `run_prefix` of the input.
            start: first recomputed position (original index), shared or one per variant.
            entry_layers: per variant, its first recomputed layer (default: all 0).
            only_last: return only each variant's last position's logits, ``[rows, d_vocab]``;
                the final block then computes only those rows' outputs (its hooks from
                `attn.hook_q` on see them alone, the ones before it every row).

        Returns:
            ``[batch * n_variants, suffix_pos, d_vocab]`` logits, item-major (rows
            ``i*n_variants ..`` are prefix item i's variants, in the order given), or
            ``[batch * n_variants, d_vocab]`` with `only_last` (variants may then start at
            different positions).

        Examples:
            >>> from mmlens.ablations import attention_knockout
            >>> prefix = model.run_prefix(inp)
            >>> last = inp.positions("last").item()
            >>> hooks = attention_knockout(inp.positions("image"), [last], range(2, 5))
            >>> suffix = model.run_suffix(prefix, last, entry_layers=[2], fwd_hooks=hooks,
            ...                           only_last=True)
            >>> full = model.run_with_hooks(inp, fwd_hooks=hooks)   # the same, from layer 0
            >>> suffix.shape                                 # [variant rows, d_vocab]
            torch.Size([1, 70])
            >>> torch.allclose(suffix[0], full[0, -1], atol=1e-4)
            True
        """
        entry = [0] * n_variants if entry_layers is None else [int(e) for e in entry_layers]
        starts = [start] * n_variants if isinstance(start, int) else [int(s) for s in start]
        if len(entry) != n_variants or not all(0 <= e < self.cfg.n_layers for e in entry):
            raise ValueError(
                f"entry_layers must give one layer in 0..{self.cfg.n_layers - 1} per variant "
                f"({n_variants}), got {entry_layers}"
            )
        if len(starts) != n_variants or not all(0 <= s < prefix.n_positions for s in starts):
            raise ValueError(
                f"start {start} is not a position of the prefix (0..{prefix.n_positions - 1}), "
                f"one for all {n_variants} variants or one per variant"
            )
        if not only_last and len(set(starts)) > 1:
            raise ValueError("variants with different starts can only return only_last logits")
        # A start inside a bidirectional group (an image block whose tokens see each other):
        # the group's earlier positions read its later ones, so a variant that changes a
        # later one changes them too. Recompute from the group's first position instead
        # (exact, a little more work); the logits returned still begin at `start`.
        asked = starts[0]
        starts = [group_start(prefix.attention_groups, s) for s in starts]
        rows: _Rows | None = None
        variant_start = torch.tensor(starts, device=prefix.attention_mask.device)
        with self.hooks(fwd_hooks=list(fwd_hooks)):
            final = self.cfg.n_layers - 1
            for layer in range(min(entry), self.cfg.n_layers):
                entering = [v for v in range(n_variants) if entry[v] == layer]
                if entering:
                    rows = self._enter(prefix, layer, rows, entering, starts, variant_start)
                past = prefix.cache.layers[layer].before(max(starts))
                self._run_block(layer, rows, past, last_rows=only_last and layer == final)
            if only_last:  # one row per variant, in variant order
                return self.to_logits(rows.resid).flatten(0, 1)
            # One start: every variant holds the same positions; they entered (and lie) in
            # order of their entry layer.
            entered = sorted(range(n_variants), key=lambda v: (entry[v], v))
            segment = [entered.index(v) for v in range(n_variants)]
            resid = rows.resid.unflatten(1, (n_variants, -1))[:, segment]
            resid = resid[:, :, asked - starts[0] :]  # from the start asked for
            return self.to_logits(resid).flatten(0, 1)

    def _enter(
        self,
        prefix: PrefixState,
        layer: int,
        rows: _Rows | None,
        variants: list[int],
        starts: list[int],
        variant_start: torch.Tensor,
    ) -> _Rows:
        """`rows` with `variants` added after them, entering at `layer` with the prefix's
        residual stream there at their positions (>= their start)."""
        positions = prefix.positions[layer]  # on this layer's device
        if rows is not None:
            rows.move_to(positions.device)
        variant_start = variant_start.to(positions.device)
        segments = []
        for variant in variants:
            first = int((positions[0] < starts[variant]).sum())
            if bool(((positions < starts[variant]).sum(1) != first).any()):
                raise ValueError(
                    "batch items keep different numbers of positions before the suffix after "
                    "pruning; run these samples one at a time"
                )
            held = positions[:, first:]
            # The mask and rotary ids stay where the prefix started; `held` is on this layer's
            # device, which a device map may make another one.
            on_first = held.to(prefix.attention_mask.device)
            segment = _Rows(
                prefix.resid_pre[layer][:, first:],
                held,
                prefix.attention_mask.gather(1, on_first).bool().to(held.device),
                gather_positions(prefix.rotary_ids, on_first).to(held.device),
                variant=torch.full_like(held, variant),
                variant_start=variant_start,
            )
            if prefix.attention_groups is not None:
                segment.groups = prefix.attention_groups.to(held.device)
            segments.append(segment)
        return _Rows.joined(([rows] if rows is not None else []) + segments)


class _Rows:
    """The rows a decoder pass is computing and what they need, updated block by block:
    residual stream, original positions, real-token flags, rotary positions, and (suffix runs)
    which variant each row belongs to. Masks and rotary tables are memoised until the
    positions change.

    Rotary ids are ``[..., batch, pos]`` (`HookedTransformer.position_ids`): they are indexed
    along their last axis only, so leading axes (multi-axis ids) pass through.
    """

    def __init__(
        self,
        resid: torch.Tensor,
        positions: torch.Tensor,
        is_real: torch.Tensor,
        rotary_ids: Int[torch.Tensor, "... batch pos"],
        variant: torch.Tensor | None = None,
        variant_start: torch.Tensor | None = None,
    ):
        self.resid, self.positions, self.is_real = resid, positions, is_real
        self.rotary_ids, self.variant, self.variant_start = rotary_ids, variant, variant_start
        self.plain_causal = False
        self.groups: Int[torch.Tensor, "batch n"] | None = None
        """Bidirectional attention group of every original position (-1: none), or None
        (`HookedTransformer.attention_groups`); indexed by position, not by row."""
        self._memo: dict[str, tuple[tuple[torch.Tensor, ...], Any]] = {}

    def memo(self, name: str, inputs: tuple[torch.Tensor, ...], make: Callable[[], Any]) -> Any:
        """`make()`, reused while `inputs` are the same tensor objects as last time (layers
        share their masks until a pruning point; the entry keeps `inputs` alive)."""
        entry = self._memo.get(name)
        if entry is None or any(a is not b for a, b in zip(entry[0], inputs, strict=True)):
            entry = self._memo[name] = (inputs, make())
        return entry[1]

    def move_to(self, device: torch.device) -> None:
        """Move every row tensor to `device` (the next block's, in a model on several
        devices); memoised masks are dropped with the old tensors."""
        if self.resid.device == device:
            return
        for name in ("resid", "positions", "is_real", "rotary_ids", "variant", "variant_start"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        self._memo.clear()

    def keep(self, index: Int[torch.Tensor, "batch kept"], resid: bool = True) -> None:
        """Keep the rows at `index`: pruning, or (`resid=False`) after a block that computed
        outputs for those rows only, so that `resid` already holds just them."""
        if resid:
            self.resid = self.resid.gather(1, index[..., None].expand(-1, -1, self.resid.shape[-1]))
        self.positions = self.positions.gather(1, index)
        self.is_real = self.is_real.gather(1, index)
        self.rotary_ids = gather_positions(self.rotary_ids, index)
        if self.variant is not None:
            self.variant = self.variant.gather(1, index)

    def last_rows(self) -> Int[torch.Tensor, "batch n"]:
        """Index of the last row (of each variant, in variant order: its rows are in increasing
        position order)."""
        index = torch.arange(self.positions.shape[1], device=self.positions.device)
        if self.variant is None:
            return index[-1:].expand(self.positions.shape[0], 1)
        n_variants = self.variant_start.shape[0]
        last = torch.full((self.variant.shape[0], n_variants), -1, device=self.variant.device)
        return last.scatter_reduce(1, self.variant, index.expand_as(self.variant), "amax")

    def state(
        self, layer: int, past: LayerKV | None, query_index: torch.Tensor | None = None
    ) -> SequenceState:
        """The block's state; with `query_index`, only those rows are queries."""
        if query_index is not None:
            keys = self.state(layer, past)
            variant = None if self.variant is None else self.variant.gather(1, query_index)
            queries = self.positions.gather(1, query_index)
            return SequenceState(layer, queries, keys.key_positions, keys.key_is_real, variant)
        if past is None:
            keys = (self.positions, self.is_real)
        else:
            keys = self.memo(
                "keys",
                (past.positions, self.positions),
                lambda: (
                    torch.cat((past.positions, self.positions), 1),
                    torch.cat((past.is_real, self.is_real), 1),
                ),
            )
        return SequenceState(layer, self.positions, *keys, self.variant)

    def key_variant(self, past: LayerKV | None) -> torch.Tensor:
        """Which variant each key belongs to (-1: the prefix)."""
        if past is None:
            return self.variant
        return torch.cat((torch.full_like(past.positions, -1), self.variant), dim=1)

    @staticmethod
    def joined(parts: list[_Rows]) -> _Rows:
        """The rows of `parts`, one after the other along the position axis."""
        if len(parts) == 1:
            return parts[0]

        def join(name: str, dim: int = 1) -> torch.Tensor:
            return torch.cat([getattr(part, name) for part in parts], dim=dim)

        joined = _Rows(
            join("resid"),
            join("positions"),
            join("is_real"),
            join("rotary_ids", dim=-1),  # [..., batch, pos]: the last axis is the sequence
            variant=join("variant"),
            variant_start=parts[-1].variant_start,
        )
        joined.groups = parts[-1].groups  # over original positions: the same for every part
        return joined


def group_start(groups: Int[torch.Tensor, "batch pos"] | None, start: int) -> int:
    """The first position of the bidirectional group holding `start` in any batch item
    (`start` itself where it is in none).

    >>> group_start(torch.tensor([[-1, 0, 0, 0, -1]]), 2), group_start(None, 2)
    (1, 2)
    """
    if groups is None:
        return start
    first = start
    for row in groups:
        group = int(row[start])
        if group >= 0:
            first = min(first, int((row == group).nonzero()[0]))
    return first


def gather_positions(
    ids: Int[torch.Tensor, "... batch pos"], index: Int[torch.Tensor, "batch n"]
) -> Int[torch.Tensor, "... batch n"]:
    """`ids` at `index` along the last (sequence) axis; leading axes of `ids` (multi-axis
    position ids) pass through."""
    return ids.gather(-1, index.expand(*ids.shape[:-2], *index.shape))
