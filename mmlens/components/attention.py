"""Multi-head / grouped-query attention with TransformerLens hook points.

Attention runs through `scaled_dot_product_attention` unless a hook is attached to
`hook_attn_scores` or `hook_pattern` (including caching hooks): only then are the
`[batch, head, q_pos, k_pos]` scores and pattern materialised. With `use_attn_result` (off by
default, as in TransformerLens: it holds `[batch, pos, head, d_model]` per layer) the output is
the sum of the per-head results `hook_result` plus `b_O`.

Weights follow TransformerLens' names and shapes (docs/transformer_lens.md): `W_K`, `W_V`,
`b_K`, `b_V` have one entry per *query* head, the key/value heads repeated under grouped-query
attention as the forward pass pairs them, so that ``W_Q[h] @ W_K[h].T`` is head h's QK circuit;
`_W_K`, `_W_V`, `_b_K`, `_b_V` are the compact `[kv_head, ...]` weights.
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import nn
from transformer_lens import FactoredMatrix

from mmlens.components.norms import RMSNorm
from mmlens.components.rotary import apply_rotary
from mmlens.hooks import HookPoint

KeyValue = tuple[
    Float[torch.Tensor, "batch k_pos kv_head d_head"],
    Float[torch.Tensor, "batch k_pos kv_head d_head"],
]


class Attention(nn.Module):
    """Self-attention; `n_key_value_heads < n_heads` gives grouped-query attention.

    Weights keep Hugging Face's layout (`q_proj.weight` is `[n_heads * d_head, d_model]`) so that
    one matmul computes all heads; `W_Q`, `W_K`, `W_V`, `W_O` and `b_*` give TransformerLens'
    per-head views.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_key_value_heads: int,
        d_head: int,
        bias: bool,
        rotary: bool,
        output_bias: bool | None = None,
        qk_norm_eps: float | None = None,
        scale: float | None = None,
        qk_norm_unit_offset: bool = False,
        qk_norm_per_head: bool = True,
    ):
        """`bias` for the query, key and value projections; `output_bias` for the output
        projection (default: `bias`; Qwen2 has the first, not the second). `qk_norm_eps`: an
        RMSNorm over each head's query and key (`q_norm`, `k_norm`; Qwen3), before `hook_q` /
        `hook_k` and the rotary; `qk_norm_unit_offset`: those norms' gain is `1 + weight`.
        `scale`: the factor on the query-key products (default `d_head ** -0.5`; a decoder
        with a `query_pre_attn_scalar` sets its own)."""
        super().__init__()
        self.n_heads, self.n_key_value_heads, self.d_head = n_heads, n_key_value_heads, d_head
        self.scale = d_head**-0.5 if scale is None else scale
        self._sdpa_scale = scale  # None: SDPA's own 1 / sqrt(d_head), bit for bit as before
        self.q_proj = nn.Linear(d_model, n_heads * d_head, bias=bias)
        self.k_proj = nn.Linear(d_model, n_key_value_heads * d_head, bias=bias)
        self.v_proj = nn.Linear(d_model, n_key_value_heads * d_head, bias=bias)
        self.o_proj = nn.Linear(
            n_heads * d_head, d_model, bias=bias if output_bias is None else output_bias
        )
        if qk_norm_eps is not None:
            self.qk_norm_per_head = qk_norm_per_head
            q_width = d_head if qk_norm_per_head else n_heads * d_head
            k_width = d_head if qk_norm_per_head else n_key_value_heads * d_head
            self.q_norm = RMSNorm(q_width, qk_norm_eps, qk_norm_unit_offset)
            self.k_norm = RMSNorm(k_width, qk_norm_eps, qk_norm_unit_offset)
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]
        if rotary:  # the vision tower has no rotary, hence no rotated-q/k hooks
            self.hook_rot_q = HookPoint()
            self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, q_pos, k_pos], masked, pre-softmax
        self.hook_pattern = HookPoint()  # [batch, head, q_pos, k_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model], with use_attn_result
        self.use_attn_result = False

    # TransformerLens-shaped views of the weights.
    @property
    def W_Q(self) -> Float[torch.Tensor, "head d_model d_head"]:
        return self._per_head_input(self.q_proj.weight, self.n_heads)

    @property
    def _W_K(self) -> Float[torch.Tensor, "kv_head d_model d_head"]:
        return self._per_head_input(self.k_proj.weight, self.n_key_value_heads)

    @property
    def _W_V(self) -> Float[torch.Tensor, "kv_head d_model d_head"]:
        return self._per_head_input(self.v_proj.weight, self.n_key_value_heads)

    @property
    def W_K(self) -> Float[torch.Tensor, "head d_model d_head"]:
        return self._repeat_kv(self._W_K, dim=0)

    @property
    def W_V(self) -> Float[torch.Tensor, "head d_model d_head"]:
        return self._repeat_kv(self._W_V, dim=0)

    @property
    def W_O(self) -> Float[torch.Tensor, "head d_head d_model"]:
        return einops.rearrange(
            self.o_proj.weight, "d_model (head d_head) -> head d_head d_model", head=self.n_heads
        )

    @property
    def b_Q(self) -> Float[torch.Tensor, "head d_head"]:
        return self._per_head_bias(self.q_proj, self.n_heads)

    @property
    def _b_K(self) -> Float[torch.Tensor, "kv_head d_head"]:
        return self._per_head_bias(self.k_proj, self.n_key_value_heads)

    @property
    def _b_V(self) -> Float[torch.Tensor, "kv_head d_head"]:
        return self._per_head_bias(self.v_proj, self.n_key_value_heads)

    @property
    def b_K(self) -> Float[torch.Tensor, "head d_head"]:
        return self._repeat_kv(self._b_K, dim=0)

    @property
    def b_V(self) -> Float[torch.Tensor, "head d_head"]:
        return self._repeat_kv(self._b_V, dim=0)

    @property
    def b_O(self) -> Float[torch.Tensor, "d_model"]:
        bias = self.o_proj.bias
        return bias if bias is not None else torch.zeros_like(self.o_proj.weight[:, 0])

    @property
    def QK(self) -> FactoredMatrix:
        """Each head's ``W_Q[h] @ W_K[h].T`` (`[head, d_model, d_model]`), factored. Rotary
        positions act between the two factors, so this is the circuit at relative distance 0;
        where `q_norm` / `k_norm` exist (`qk_norm_eps`), they act there too and are left out."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """Each head's ``W_V[h] @ W_O[h]`` (`[head, d_model, d_model]`), factored."""
        return FactoredMatrix(self.W_V, self.W_O)

    def _per_head_input(self, weight: torch.Tensor, n_heads: int) -> torch.Tensor:
        return einops.rearrange(
            weight, "(head d_head) d_model -> head d_model d_head", head=n_heads
        )

    def _per_head_bias(self, linear: nn.Linear, n_heads: int) -> torch.Tensor:
        weight = linear.weight
        bias = linear.bias if linear.bias is not None else weight.new_zeros(weight.shape[0])
        return bias.view(n_heads, self.d_head)

    def _split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], n_heads, self.d_head)

    def forward(
        self,
        x: Float[torch.Tensor, "batch pos d_model"],
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: Bool[torch.Tensor, "batch 1 q_pos k_pos"] | None = None,
        is_causal: bool = False,
        past_key_value: KeyValue | None = None,
        query_index: Int[torch.Tensor, "batch q_pos"] | None = None,
    ) -> tuple[Float[torch.Tensor, "batch q_pos d_model"], KeyValue]:
        """Attend; returns the output and this call's new (rotated) keys and values.

        `mask` is True where a query may attend to a key; with `mask=None`, `is_causal` selects
        plain causal attention (no padding, no past) or full attention (vision tower). The keys
        are `past_key_value` followed by the new ones. `query_index` (rows of `x`) computes
        queries, and so outputs, for those rows only; every row still gives keys and values
        (`mask` is then over those rows).
        """
        x_queries, rotary_queries = x, rotary
        if query_index is not None:
            x_queries = _rows(x, query_index)
            rotary_queries = (
                None if rotary is None else tuple(_rows(t, query_index) for t in rotary)
            )
        q = self._split_heads(self.q_proj(x_queries), self.n_heads)
        k = self._split_heads(self.k_proj(x), self.n_key_value_heads)
        if hasattr(self, "q_norm") and self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        elif hasattr(self, "q_norm"):  # one norm over every head's features together
            q = self.q_norm(q.flatten(-2)).view_as(q)
            k = self.k_norm(k.flatten(-2)).view_as(k)
        q, k = self.hook_q(q), self.hook_k(k)
        v = self.hook_v(self._split_heads(self.v_proj(x), self.n_key_value_heads))
        if rotary is not None:
            q = self.hook_rot_q(apply_rotary(q, *rotary_queries))
            k = self.hook_rot_k(apply_rotary(k, *rotary))
        keys, values = k, v
        if past_key_value is not None:
            keys = torch.cat((past_key_value[0], k), dim=1)
            values = torch.cat((past_key_value[1], v), dim=1)
        q_heads, k_heads, v_heads = (t.transpose(1, 2) for t in (q, keys, values))
        if self._scores_hooked():
            z_heads = self._attend_explicitly(q_heads, k_heads, v_heads, mask, is_causal)
        else:
            z_heads = F.scaled_dot_product_attention(
                q_heads,
                k_heads,
                v_heads,
                attn_mask=mask,
                is_causal=is_causal and mask is None,
                scale=self._sdpa_scale,
                enable_gqa=self.n_key_value_heads != self.n_heads,
            )
        z = self.hook_z(z_heads.transpose(1, 2))
        if self.use_attn_result:
            result = self.hook_result(einops.einsum(z, self.W_O, "b p h d, h d m -> b p h m"))
            return result.sum(2) + self.b_O, (k, v)
        return self.o_proj(z.reshape(*z.shape[:2], -1)), (k, v)

    def _scores_hooked(self) -> bool:
        # Any PyTorch hook counts (TransformerLens hooks, run_with_cache's caching hooks), and a
        # cache sink.
        hooked = (self.hook_attn_scores, self.hook_pattern)
        return any(
            point._forward_hooks or point._backward_hooks or point.sink is not None
            for point in hooked
        )

    def _repeat_kv(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Key/value heads along `dim` -> one copy per query head, as grouped-query attention
        pairs them (query head h reads key/value head ``h // (n_heads / n_kv_heads)``)."""
        group = self.n_heads // self.n_key_value_heads
        return tensor.repeat_interleave(group, dim=dim) if group > 1 else tensor

    def _pattern_from_scores(
        self, scores: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """Mask, `hook_attn_scores`, softmax, `hook_pattern`: the pattern."""
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))  # in place: `scores` is a fresh tensor
        scores = self.hook_attn_scores(scores)
        return self.hook_pattern(F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype))

    def _attend_explicitly(
        self,
        q: Float[torch.Tensor, "batch head q_pos d_head"],
        k: Float[torch.Tensor, "batch kv_head k_pos d_head"],
        v: Float[torch.Tensor, "batch kv_head k_pos d_head"],
        mask: torch.Tensor | None,
        is_causal: bool,
    ) -> Float[torch.Tensor, "batch head q_pos d_head"]:
        """Scores and pattern as tensors, so that hooks can read and edit them."""
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        scores = (q * self.scale) @ k.transpose(-1, -2)
        if mask is None and is_causal:
            n_q, n_k = scores.shape[-2:]
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        return self._pattern_from_scores(scores, mask, q.dtype) @ v


def _rows(tensor: torch.Tensor, index: Int[torch.Tensor, "batch rows"]) -> torch.Tensor:
    """`tensor[b, index[b]]` for every batch item: `[batch, pos, ...]` -> `[batch, rows, ...]`."""
    return tensor.gather(
        1,
        index.view(*index.shape, *[1] * (tensor.ndim - 2)).expand(*index.shape, *tensor.shape[2:]),
    )
