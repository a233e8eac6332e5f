"""MLPs: the decoder's gated SiLU MLP and the vision tower's plain two-layer MLP."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn
from transformers.activations import ACT2FN

from mmlens.hooks import HookPoint


class GatedMLP(nn.Module):
    """`down(act(gate(x)) * up(x))` (Llama / Mistral).

    Hooks: `hook_pre` = gate pre-activation, `hook_pre_linear` = up projection,
    `hook_post` = their gated product ([batch, pos, d_mlp]).
    """

    def __init__(self, d_model: int, d_mlp: int, act_fn: str, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.act = ACT2FN[act_fn]
        self.hook_pre = HookPoint()
        self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    @property
    def W_gate(self) -> Float[torch.Tensor, "d_model d_mlp"]:
        return self.gate_proj.weight.T

    @property
    def W_in(self) -> Float[torch.Tensor, "d_model d_mlp"]:
        return self.up_proj.weight.T

    @property
    def W_out(self) -> Float[torch.Tensor, "d_mlp d_model"]:
        return self.down_proj.weight.T

    @property
    def b_in(self) -> Float[torch.Tensor, "d_mlp"]:
        return _bias(self.up_proj)

    @property
    def b_gate(self) -> Float[torch.Tensor, "d_mlp"]:
        return _bias(self.gate_proj)

    @property
    def b_out(self) -> Float[torch.Tensor, "d_model"]:
        return _bias(self.down_proj)

    def forward(
        self, x: Float[torch.Tensor, "batch pos d_model"]
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        pre = self.hook_pre(self.gate_proj(x))
        pre_linear = self.hook_pre_linear(self.up_proj(x))
        return self.down_proj(self.hook_post(self.act(pre) * pre_linear))


class MLP(nn.Module):
    """`fc2(act(fc1(x)))` (CLIP). Hooks: `hook_pre` ([batch, pos, d_mlp]) and `hook_post`."""

    def __init__(self, d_model: int, d_mlp: int, act_fn: str):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_mlp)
        self.fc2 = nn.Linear(d_mlp, d_model)
        self.act = ACT2FN[act_fn]
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    @property
    def W_out(self) -> Float[torch.Tensor, "d_mlp d_model"]:
        return self.fc2.weight.T

    def forward(
        self, x: Float[torch.Tensor, "batch pos d_model"]
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        return self.fc2(self.hook_post(self.act(self.hook_pre(self.fc1(x)))))


def _bias(linear: nn.Linear) -> torch.Tensor:
    """The layer's bias, or zeros where it has none (Llama), as TransformerLens shows it."""
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
