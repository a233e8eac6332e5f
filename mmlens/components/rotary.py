"""Rotary position embedding with the checkpoint's `rope_theta` and scaling.

Frequencies come from transformers' own `ROPE_INIT_FUNCTIONS` for scaled variants (llama3,
linear, yarn), so a Llama-3 checkpoint rotates exactly as in HF.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import nn

# Rope types whose frequencies depend only on the config (not on the running sequence length).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_frequencies(
    d_head: int, rope_parameters: Mapping[str, Any], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[d_head / 2]` and the cos/sin scaling factor.

    Args:
        d_head: the rotated dimension of each head.
        rope_parameters: the checkpoint's `rope_parameters` (HF's form): `rope_type`,
            `rope_theta` and the scaling settings of that type (`factor`, ...).
        max_position_embeddings: the checkpoint's context length (yarn reads it).
    """
    params = dict(rope_parameters)
    rope_type = params.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise NotImplementedError(
            f"rope_type {rope_type!r} is not supported; supported: {STATIC_ROPE_TYPES}"
        )
    if rope_type == "default":
        dims = torch.arange(0, d_head, 2, dtype=torch.float32, device="cpu")
        return 1.0 / (params["rope_theta"] ** (dims / d_head)), 1.0
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # HF's rope functions read `head_dim` (a model's width and head count only stand in for a
    # missing one).
    hf_config = LlamaConfig(
        hidden_size=d_head,
        num_attention_heads=1,
        head_dim=d_head,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=params,
    )
    with torch.device("cpu"):  # real numbers even while the model is built on the meta device
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, device="cpu")
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Maps position ids to the cos/sin tables applied to queries and keys.

    Built from the rotary parameters alone (`rope_frequencies`), not a model config.

    Multi-axis rotary (`sections`): position ids ``[n_axes, batch, pos]`` give each token one
    position per axis (e.g. time, row, column); the `d_head / 2` frequencies are cut into
    consecutive sections, the i-th rotated by the ids of axis i. 1-D ids ``[batch, pos]`` then
    stand for the same position on every axis (plain rotary). With `interleaved` the axes take
    turns instead (frequency i by axis i % 3 while i < 3 * that axis' section, by axis 0 past
    it), as HF's ``mrope_interleaved``.

    Examples:
        >>> rotary = RotaryEmbedding(8, {"rope_theta": 10000.0}, sections=(2, 1, 1))
        >>> ids = torch.tensor([5, 3, 4])[:, None, None]  # [axis, batch, pos]
        >>> cos, _ = rotary(ids, torch.float32)
        >>> torch.allclose(cos[0, 0, :4], (torch.tensor([5, 5, 3, 4]) * rotary.inv_freq).cos())
        True
    """

    def __init__(
        self,
        d_head: int,
        rope_parameters: Mapping[str, Any],
        max_position_embeddings: int = 4096,
        sections: Sequence[int] | None = None,
        interleaved: bool = False,
    ):
        super().__init__()
        if sections is not None and sum(sections) != d_head // 2:
            raise ValueError(
                f"rotary sections {list(sections)} must sum to d_head / 2 = {d_head // 2}"
            )
        self.sections = None if sections is None else tuple(int(n) for n in sections)
        self.axis_of_frequency: torch.Tensor | None = None
        if interleaved and self.sections is not None:
            # Interleaved: frequency i turns by axis i % 3 among the first 3 * section of that
            # axis, else by axis 0 (time, row, column, time, row, column, ...).
            index = torch.arange(d_head // 2, device="cpu")
            axis = index % 3
            limits = torch.tensor([d_head // 2, *(3 * n for n in self.sections[1:])], device="cpu")
            self.axis_of_frequency = torch.where(index < limits[axis], axis, 0)
        inv_freq, self.attention_scaling = rope_frequencies(
            d_head, rope_parameters, max_position_embeddings
        )
        # Not persistent: derived from the config, never read from a checkpoint. Created on the
        # CPU explicitly so that a model built on the meta device still gets real frequencies.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(
        self, position_ids: Int[torch.Tensor, "... batch pos"], dtype: torch.dtype
    ) -> tuple[Float[torch.Tensor, "batch pos d_head"], Float[torch.Tensor, "batch pos d_head"]]:
        # .to: in a model on several devices the blocks' rows live elsewhere (a no-op if not)
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        if self.sections is not None:
            if position_ids.ndim == 2:  # one position for every axis
                freqs = freqs[None].expand(len(self.sections), *freqs.shape)
            if self.axis_of_frequency is not None:
                axis = self.axis_of_frequency.to(freqs.device)
                freqs = freqs.gather(0, axis.expand(*freqs.shape[1:])[None]).squeeze(0)
            else:
                parts = freqs.split(self.sections, dim=-1)
                freqs = torch.cat([part[axis] for axis, part in enumerate(parts)], dim=-1)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(
    x: Float[torch.Tensor, "batch pos head d_head"],
    cos: Float[torch.Tensor, "batch pos d_head"],
    sin: Float[torch.Tensor, "batch pos d_head"],
) -> Float[torch.Tensor, "batch pos head d_head"]:
    """Rotate pairs (i, i + d_head/2) of every head by the position's angle (HF convention)."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return x * cos[:, :, None] + rotated_half * sin[:, :, None]
