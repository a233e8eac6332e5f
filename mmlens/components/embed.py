"""Token embedding and unembedding (weights in Hugging Face layout, TL-shaped views)."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import nn


class Embed(nn.Module):
    """Token embedding; with `scale`, the looked-up vectors are multiplied by it, the factor
    first cast to the weight's dtype (e.g. sqrt(d_model), rounded as HF rounds it)."""

    def __init__(self, d_vocab: int, d_model: int, scale: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_vocab, d_model))
        self.scale = scale

    @property
    def W_E(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        return self.weight

    def forward(
        self, tokens: Int[torch.Tensor, "batch pos"]
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        embedded = nn.functional.embedding(tokens, self.weight)
        if self.scale is None:
            return embedded
        return embedded * torch.tensor(self.scale, device=embedded.device).to(self.weight.dtype)


class Unembed(nn.Module):
    def __init__(self, d_model: int, d_vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_vocab, d_model))

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        return self.weight.T

    def forward(
        self, x: Float[torch.Tensor, "batch pos d_model"]
    ) -> Float[torch.Tensor, "batch pos d_vocab"]:
        return nn.functional.linear(x, self.weight)
