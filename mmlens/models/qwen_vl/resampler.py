"""Qwen-VL's resampler: 256 learned queries read the vision tower's patch features through one
cross-attention, with 2-D sin-cos positions added to the queries and to the patches' keys; a
layernorm and a square projection then give the decoder's 256 image tokens.

Hooks under `resampler.` (docs/hooks.md, "Qwen-VL"): `hook_kv` (``[image, patch, d_model]``:
the patch features after `kv_proj` and `ln_kv`, the values), `hook_q`, `hook_k`, `hook_v`,
`hook_attn_scores` and `hook_pattern` (``[image, head, query, patch]``: how much each query reads
each patch, row-major on the patch grid), `hook_z`, `hook_out` (``[image, query, d_model]``, the
attention's output before `ln_post` and `proj`). The release's ``Resampler`` (``visual.py``)
plus its tower's ``ln_post`` and ``proj``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import nn

from mmlens.components import CrossAttention, LayerNorm
from mmlens.hooks import HookPoint
from mmlens.models.vision import resize_positions


@dataclass
class ResamplerConfig:
    """The resampler's sizes, and the release's chat format (``chatml`` for Qwen-VL-Chat,
    ``raw`` for Qwen-VL), which decides the model's default template."""

    n_queries: int
    d_model: int
    n_heads: int
    d_kv: int
    eps: float = 1e-6
    chat_format: str = "chatml"


class HookedResampler(CrossAttention):
    """``ln_post(attention(ln_q(queries) + pos, ln_kv(kv_proj(patches)) + pos', ...)) @ proj``:
    the learned `queries` (``[n_queries, d_model]``) with the fixed 2-D sin-cos `pos_embed` of
    their 16 x 16 grid attend to the patches, whose keys carry `pos_embed` resized to the patch
    grid and whose values carry none.

    Examples:
        >>> qwen_vl.resampler.cfg.n_queries, qwen_vl.resampler.queries.shape
        (16, torch.Size([16, 256]))
    """

    def __init__(self, cfg: ResamplerConfig):
        super().__init__(cfg.d_model, cfg.n_heads, cfg.d_model)
        self.cfg = cfg
        self.queries = nn.Parameter(torch.empty(cfg.n_queries, cfg.d_model))
        self.pos_embed = nn.Parameter(torch.empty(cfg.n_queries, cfg.d_model), requires_grad=False)
        self.kv_proj = (
            nn.Linear(cfg.d_kv, cfg.d_model, bias=False)
            if cfg.d_kv != cfg.d_model
            else nn.Identity()
        )
        self.ln_q = LayerNorm(cfg.d_model, cfg.eps)
        self.ln_kv = LayerNorm(cfg.d_model, cfg.eps)
        self.ln_post = LayerNorm(cfg.d_model, cfg.eps)
        self.proj = nn.Parameter(torch.empty(cfg.d_model, cfg.d_model))
        self.hook_kv = HookPoint()  # [image, patch, d_model]
        self.hook_out = HookPoint()  # [image, query, d_model]

    def forward(
        self, patches: Float[torch.Tensor, "image patch d_kv"]
    ) -> Float[torch.Tensor, "image query d_model"]:
        """The image tokens of each image's patch features."""
        values = self.hook_kv(self.ln_kv(self.kv_proj(patches)))
        keys = values + resize_positions(self.pos_embed, values.shape[1])
        queries = (self.ln_q(self.queries) + self.pos_embed).expand(values.shape[0], -1, -1)
        out = self.hook_out(super().forward(queries, keys, values_from=values))
        return self.ln_post(out) @ self.proj
