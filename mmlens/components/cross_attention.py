"""BERT-style multi-head attention whose keys and values may come from another sequence
(learned queries reading image features)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float
from torch import nn

from mmlens.hooks import HookPoint


class CrossAttention(nn.Module):
    """Multi-head attention with `query`, `key`, `value` and `out` projections, all biased;
    keys and values from the same sequence (self-attention) or from `d_kv`-wide features
    (cross-attention). Scores and pattern are always materialised (the sequences are short).

    Hooks: `hook_q` ``[batch, q_pos, head, d_head]``, `hook_k` and `hook_v`
    ``[batch, k_pos, head, d_head]``, `hook_attn_scores` (masked, pre-softmax) and
    `hook_pattern` ``[batch, head, q_pos, k_pos]``, `hook_z` ``[batch, q_pos, head, d_head]``.

    Examples:
        >>> attention = CrossAttention(d_model=8, n_heads=2, d_kv=4)
        >>> attention(torch.randn(1, 3, 8), torch.randn(1, 5, 4)).shape
        torch.Size([1, 3, 8])
    """

    def __init__(self, d_model: int, n_heads: int, d_kv: int):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_kv, d_model)
        self.value = nn.Linear(d_kv, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.hook_q = HookPoint()  # [batch, q_pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, k_pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, k_pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, q_pos, k_pos], masked, pre-softmax
        self.hook_pattern = HookPoint()  # [batch, head, q_pos, k_pos]
        self.hook_z = HookPoint()  # [batch, q_pos, head, d_head]

    def forward(
        self,
        x: Float[torch.Tensor, "batch q_pos d_model"],
        keys_from: Float[torch.Tensor, "batch k_pos d_kv"],
        key_is_real: Bool[torch.Tensor, "batch k_pos"] | None = None,
        values_from: Float[torch.Tensor, "batch k_pos d_kv"] | None = None,
    ) -> Float[torch.Tensor, "batch q_pos d_model"]:
        """`x` reads `keys_from` (and `values_from`, default the same); keys where
        `key_is_real` is False (padding) are never attended to."""

        def heads(linear: nn.Linear, states: torch.Tensor) -> torch.Tensor:
            return rearrange(linear(states), "b p (h d) -> b p h d", h=self.n_heads)

        values_from = keys_from if values_from is None else values_from
        q = self.hook_q(heads(self.query, x))
        k = self.hook_k(heads(self.key, keys_from))
        v = self.hook_v(heads(self.value, values_from))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.d_head**-0.5
        if key_is_real is not None:
            scores = scores.masked_fill(
                ~key_is_real[:, None, None, :], torch.finfo(scores.dtype).min
            )
        pattern = self.hook_pattern(F.softmax(self.hook_attn_scores(scores), dim=-1))
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, v))
        return self.out(rearrange(z, "b q h d -> b q (h d)"))
