"""LLaVA's multimodal projector: `linear_2(act(linear_1(features)))`, or `linear_1(features)`
alone where `act_fn` is None (the original LLaVA v0 releases' and Shikra's one linear
`mm_projector`).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn
from transformers.activations import ACT2FN

from mmlens.hooks import HookPoint


class Projector(nn.Module):
    def __init__(self, d_in: int, d_model: int, act_fn: str | None, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_model, bias=bias)
        if act_fn is not None:
            self.act = ACT2FN[act_fn]
            self.linear_2 = nn.Linear(d_model, d_model, bias=bias)
        self.hook_in = HookPoint()  # [n_images, n_tokens, d_in]
        self.hook_out = HookPoint()  # [n_images, n_tokens, d_model]

    def forward(
        self, features: Float[torch.Tensor, "image token d_in"]
    ) -> Float[torch.Tensor, "image token d_model"]:
        projected = self.linear_1(self.hook_in(features))
        if hasattr(self, "linear_2"):
            projected = self.linear_2(self.act(projected))
        return self.hook_out(projected)
