"""Pre-norm residual block: `resid + attn(ln1(resid))`, then `+ mlp(ln2(resid))`; with
sandwich norms `resid + ln1_post(attn(ln1(resid)))`, then `+ ln2_post(mlp(ln2(resid)))`."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import nn

from mmlens.components.attention import Attention, KeyValue
from mmlens.hooks import HookPoint

EVERY_ROW_HOOKS = frozenset(
    ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_k", "attn.hook_v",
     "attn.hook_rot_k"]
)  # fmt: skip
"""Hook points that see every row even when only some rows are queried: the block's input, its
norm, and the keys and values every row gives."""


class TransformerBlock(nn.Module):
    """One layer, shared by the decoder (RMSNorm, gated MLP) and the vision tower (LayerNorm).

    With `position_hooks=True` (the decoder) the block also has three hook points that the
    model fires before the block runs, each holding original sequence indices `[batch, pos]`:
    `hook_prune` (a hook may return a subset: the other positions are removed from the
    sequence from this block on), `hook_positions` (this block's queries, after pruning) and
    `hook_key_positions` (its keys: cached positions followed by the queries). The model also
    `publish`es the block's `SequenceState` on every hook point's context, so that a hook
    reads its layer and positions from `hook.ctx["sequence"]`.
    """

    hook_out_is_single_residual_stream = True
    """`hook_resid_post` is the residual stream the next block (or the unembedding) reads, as
    TransformerLens' `cache.logit_lens()` requires."""

    def __init__(
        self,
        ln1: nn.Module,
        attn: Attention,
        ln2: nn.Module,
        mlp: nn.Module,
        position_hooks: bool = False,
        ln1_post: nn.Module | None = None,
        ln2_post: nn.Module | None = None,
    ):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp
        # Sandwich norms (a decoder family's `sandwich_norms`): the attention's and the MLP's outputs are normed before
        # they join the residual stream; TransformerLens names them ln1_post and ln2_post, and
        # hook_attn_out / hook_mlp_out hold what is added (after them), as there.
        if ln1_post is not None:
            self.ln1_post = ln1_post
        if ln2_post is not None:
            self.ln2_post = ln2_post
        if position_hooks:
            self.hook_prune = HookPoint()
            self.hook_positions = HookPoint()
            self.hook_key_positions = HookPoint()
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        # Plain lists: these modules are registered once, as the submodules above.
        points = [(name, m) for name, m in self.named_modules() if isinstance(m, HookPoint)]
        self._every_row_points = [m for name, m in points if name in EVERY_ROW_HOOKS]
        self._query_row_points = [m for name, m in points if name not in EVERY_ROW_HOOKS]

    def publish(self, state: object, every_row_state: object | None = None) -> None:
        """Put `state` (a `mmlens.sequence.SequenceState`) on the context of every hook point of
        this block, where hooks find it as `hook.ctx["sequence"]`.

        `every_row_state`: when only some rows go on past the attention (`query_index`), the
        state of all rows, for the hook points that still see every row (`EVERY_ROW_HOOKS`)."""
        for point in self._query_row_points:
            point.ctx["sequence"] = state
        for point in self._every_row_points:
            point.ctx["sequence"] = state if every_row_state is None else every_row_state

    def forward(
        self,
        resid: Float[torch.Tensor, "batch pos d_model"],
        query_index: Int[torch.Tensor, "batch q_pos"] | None = None,
        **attn_kwargs,
    ) -> tuple[Float[torch.Tensor, "batch q_pos d_model"], KeyValue]:
        """`attn_kwargs` go to `Attention.forward` (rotary, mask, is_causal, past_key_value).

        With `query_index`, only those rows go on past the attention (their outputs are the
        only ones read); every row still gives keys and values.
        """
        resid = self.hook_resid_pre(resid)
        attn_out, key_value = self.attn(self.ln1(resid), query_index=query_index, **attn_kwargs)
        if query_index is not None:
            resid = resid.gather(1, query_index[..., None].expand(-1, -1, resid.shape[-1]))
        if hasattr(self, "ln1_post"):
            attn_out = self.ln1_post(attn_out)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(attn_out))
        mlp_out = self.mlp(self.ln2(resid))
        if hasattr(self, "ln2_post"):
            mlp_out = self.ln2_post(mlp_out)
        resid = self.hook_resid_post(resid + self.hook_mlp_out(mlp_out))
        return resid, key_value
