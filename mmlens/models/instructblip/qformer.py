"""HookedQFormer: InstructBLIP's Querying Transformer with TransformerLens hook names under
`qformer.`.

A BERT encoder (post-layernorm blocks) over a sequence of learned query tokens followed by the
instruction's tokens (its own BERT vocabulary and absolute positions; the queries get no
position embedding). Queries and text attend to each other (padding excluded). In blocks 0, f,
2f, ... (f = `cross_attention_frequency`) the queries alone then attend to the vision tower's
features; queries and text have their own MLPs. The queries' last states are what the decoder
receives (through `language_projection`). HF: `InstructBlipQFormerModel`.

Hooks, per block `qformer.blocks.{l}`: `hook_resid_pre`, `attn.hook_q/k/v`, `attn.hook_pattern`
(``[batch, head, query_and_text, query_and_text]``), `attn.hook_z`, `hook_resid_mid` (after the
self-attention's layernorm); in cross-attention blocks `cross_attn.hook_q/k/v`,
`cross_attn.hook_pattern` (``[batch, head, query, vision_token]``: how much each query reads
each vision token, CLS first, then the patches row-major), `cross_attn.hook_z` and
`hook_resid_cross`; then `hook_resid_post`. Plus `qformer.hook_embed` (after the embedding
layernorm) and `qformer.hook_query_out` (``[batch, query, d_qformer]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import nn

from mmlens.components import MLP, CrossAttention, LayerNorm
from mmlens.hooks import HookPoint


@dataclass
class QFormerConfig:
    """InstructBLIP's Q-Former: a BERT encoder (post-layernorm blocks) over learned query tokens
    followed by the instruction's tokens; every `cross_attention_frequency`-th block (0, f, 2f,
    ...) lets the queries attend to the vision tower's features (`d_encoder` wide); queries and
    text have separate MLPs."""

    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    d_vocab: int
    n_positions: int
    d_encoder: int
    n_query_tokens: int
    cross_attention_frequency: int = 2
    eps: float = 1e-12
    act_fn: str = "gelu"

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0

    @classmethod
    def from_hf(cls, hf: Any, n_query_tokens: int) -> QFormerConfig:
        return cls(
            n_layers=hf.num_hidden_layers,
            d_model=hf.hidden_size,
            n_heads=hf.num_attention_heads,
            d_mlp=hf.intermediate_size,
            d_vocab=hf.vocab_size,
            n_positions=hf.max_position_embeddings,
            d_encoder=hf.encoder_hidden_size,
            n_query_tokens=n_query_tokens,
            cross_attention_frequency=hf.cross_attention_frequency,
            eps=hf.layer_norm_eps,
            act_fn=hf.hidden_act,
        )


class QFormerBlock(nn.Module):
    """Self-attention over queries and text, cross-attention of the queries to the image (where
    the block has one), and separate MLPs for queries and text; each sub-layer is added to its
    input and layernormed (BERT's post-layernorm)."""

    def __init__(self, cfg: QFormerConfig, cross_attention: bool):
        super().__init__()
        self.attn = CrossAttention(cfg.d_model, cfg.n_heads, cfg.d_model)
        self.ln_attn = LayerNorm(cfg.d_model, cfg.eps)
        if cross_attention:
            self.cross_attn = CrossAttention(cfg.d_model, cfg.n_heads, cfg.d_encoder)
            self.ln_cross = LayerNorm(cfg.d_model, cfg.eps)
            self.hook_resid_cross = HookPoint()  # [batch, query, d]
        self.mlp_query = MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn)
        self.ln_mlp_query = LayerNorm(cfg.d_model, cfg.eps)
        self.mlp_text = MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn)
        self.ln_mlp_text = LayerNorm(cfg.d_model, cfg.eps)
        self.hook_resid_pre = HookPoint()  # [batch, query_and_text, d]
        self.hook_resid_mid = HookPoint()  # [batch, query_and_text, d]
        self.hook_resid_post = HookPoint()  # [batch, query_and_text, d]

    def forward(
        self,
        resid: Float[torch.Tensor, "batch pos d"],
        is_real: torch.Tensor,
        image_features: Float[torch.Tensor, "batch vision_token d_encoder"],
        n_queries: int,
    ) -> Float[torch.Tensor, "batch pos d"]:
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(self.ln_attn(resid + self.attn(resid, resid, is_real)))
        queries, text = resid[:, :n_queries], resid[:, n_queries:]
        if hasattr(self, "cross_attn"):
            queries = self.ln_cross(queries + self.cross_attn(queries, image_features))
            queries = self.hook_resid_cross(queries)
        queries = self.ln_mlp_query(queries + self.mlp_query(queries))
        text = self.ln_mlp_text(text + self.mlp_text(text))
        return self.hook_resid_post(torch.cat([queries, text], dim=1))


class HookedQFormer(nn.Module):
    """The Q-Former (see the module doc): ``qformer(image_features, input_ids, attention_mask)``
    gives the queries' last states, ``[batch, n_query_tokens, d_qformer]``."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.empty(cfg.n_query_tokens, cfg.d_model))
        self.word_embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_positions, cfg.d_model)
        self.ln_embed = LayerNorm(cfg.d_model, cfg.eps)
        self.hook_embed = HookPoint()  # [batch, query_and_text, d]
        self.blocks = nn.ModuleList(
            QFormerBlock(cfg, cfg.has_cross_attention(layer)) for layer in range(cfg.n_layers)
        )
        self.hook_query_out = HookPoint()  # [batch, query, d]

    def forward(
        self,
        image_features: Float[torch.Tensor, "batch vision_token d_encoder"],
        input_ids: Int[torch.Tensor, "batch text_pos"],
        attention_mask: Int[torch.Tensor, "batch text_pos"],
    ) -> Float[torch.Tensor, "batch query d"]:
        batch, n_text = input_ids.shape
        n_queries = self.cfg.n_query_tokens
        text = self.word_embed(input_ids) + self.pos_embed.weight[:n_text]
        queries = self.query_tokens.to(text.dtype).expand(batch, -1, -1)
        resid = self.hook_embed(self.ln_embed(torch.cat([queries, text], dim=1)))
        is_real = torch.cat(
            [attention_mask.new_ones(batch, n_queries), attention_mask], dim=1
        ).bool()
        image_features = image_features.to(resid.dtype)
        for block in self.blocks:
            resid = block(resid, is_real, image_features, n_queries)
        return self.hook_query_out(resid[:, :n_queries])
