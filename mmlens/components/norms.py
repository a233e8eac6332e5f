"""RMSNorm (decoder) and LayerNorm (vision tower), each exposing its scale and output."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn

from mmlens.hooks import HookPoint


class RMSNorm(nn.Module):
    """Llama RMSNorm: `weight * x / sqrt(mean(x^2) + eps)`, computed in float32 like HF.

    With `unit_offset` the gain is `1 + weight` and is applied in float32
    before the cast back, as HF's RMSNorms of that kind do (Llama's multiplies after the cast).

    Hooks: `hook_scale` ([batch, pos, 1], float32) and `hook_normalized` ([batch, pos, d]).

    Examples:
        >>> norm = RMSNorm(4, 1e-6, unit_offset=True)   # weight 1: a gain of 2
        >>> norm(torch.tensor([[[1.0, -1.0, 1.0, -1.0]]])).round(decimals=4).tolist()
        [[[2.0, -2.0, 2.0, -2.0]]]
    """

    def __init__(self, d_model: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.ones(d_model))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    @property
    def gain(self) -> Float[torch.Tensor, "d"]:
        """What multiplies the normalised vector: `weight`, or `1 + weight` (`unit_offset`)."""
        return 1.0 + self.weight if self.unit_offset else self.weight

    def forward(self, x: Float[torch.Tensor, "batch pos d"]) -> Float[torch.Tensor, "batch pos d"]:
        x32 = x.float()
        scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        if self.unit_offset:
            return self.hook_normalized((x32 / scale * (1.0 + self.weight.float())).to(x.dtype))
        return self.hook_normalized(self.weight * (x32 / scale).to(x.dtype))


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens hooks: `hook_scale` is sqrt(var + eps)."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[torch.Tensor, "batch pos d"]) -> Float[torch.Tensor, "batch pos d"]:
        x32 = x.float()
        x32 = x32 - x32.mean(-1, keepdim=True)
        scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(
            (x32 / scale * self.weight.float() + self.bias.float()).to(x.dtype)
        )
