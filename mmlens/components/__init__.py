"""Small modules with hook points; none of them knows about images."""

from mmlens.components.attention import Attention
from mmlens.components.block import TransformerBlock
from mmlens.components.cross_attention import CrossAttention
from mmlens.components.embed import Embed, Unembed
from mmlens.components.mlp import MLP, GatedMLP
from mmlens.components.norms import LayerNorm, RMSNorm
from mmlens.components.rotary import RotaryEmbedding

__all__ = [
    "MLP",
    "Attention",
    "CrossAttention",
    "Embed",
    "GatedMLP",
    "LayerNorm",
    "RMSNorm",
    "RotaryEmbedding",
    "TransformerBlock",
    "Unembed",
]
