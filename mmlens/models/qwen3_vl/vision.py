"""Qwen3-VL's vision tower, merger and DeepStack mergers, with hook names under `vision.`.

Qwen2-VL's tower (`HookedQwen2VLVision`: the processor's patch order, 2-D rotary, attention
within each image) with a biased patch convolution, a learned square grid of position
embeddings resampled to each image's patch grid (bilinear, corners aligned) and added after the
patch embedding, and GELU (tanh) MLPs. After the blocks in ``deepstack_visual_indexes`` a
DeepStack merger (each 2 x 2 cell's patches concatenated, then a LayerNorm and an MLP) turns
that block's output into one vector per image token; the decoder adds the k-th of them to its
residual stream at the image tokens after its block k (`HookedQwen3VL`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import nn

from mmlens.components import MLP, Attention, LayerNorm, TransformerBlock
from mmlens.config import VisionConfig
from mmlens.hooks import HookPoint
from mmlens.models.qwen2_vl.vision import (
    HookedQwen2VLVision,
    Qwen2VLPatchEmbed,
    Qwen2VLVisionExtras,
    patch_rows_cols,
)


@dataclass
class Qwen3VLVisionExtras(Qwen2VLVisionExtras):
    """`Qwen2VLVisionExtras` and Qwen3-VL's additions.

    Attributes:
        num_position_embeddings: entries of the learned position grid (a square).
        deepstack_layers: the tower blocks whose outputs feed the DeepStack mergers, in the
            order of the decoder layers they enter after.
    """

    num_position_embeddings: int = 2304
    deepstack_layers: tuple[int, ...] = ()


class Qwen3VLMerger(nn.Module):
    """Each 2 x 2 cell's four patches concatenated into one image token, with a LayerNorm on
    every patch before (`postshuffle=False`: the merger) or on the concatenation after
    (`postshuffle=True`: a DeepStack merger), then a GELU MLP to the decoder's width. Hook:
    `hook_merged` (``[1, cell, 4 * d_vision]``, the MLP's input)."""

    def __init__(self, cfg: VisionConfig, extras: Qwen3VLVisionExtras, postshuffle: bool):
        super().__init__()
        self.d_cell = cfg.d_model * extras.merge_size**2
        self.postshuffle = postshuffle
        self.norm = LayerNorm(self.d_cell if postshuffle else cfg.d_model, 1e-6)
        self.linear_fc1 = nn.Linear(self.d_cell, self.d_cell)
        self.act = nn.GELU()
        self.linear_fc2 = nn.Linear(self.d_cell, extras.d_out)
        self.hook_merged = HookPoint()

    def forward(
        self, features: Float[torch.Tensor, "1 patch d_vision"]
    ) -> Float[torch.Tensor, "1 cell d_model"]:
        if self.postshuffle:
            merged = self.norm(features.reshape(1, -1, self.d_cell))
        else:
            merged = self.norm(features).reshape(1, -1, self.d_cell)
        return self.linear_fc2(self.act(self.linear_fc1(self.hook_merged(merged))))


def interpolated_positions(
    table: Float[torch.Tensor, "n d"], grid_thw: Int[torch.Tensor, "image 3"], merge_size: int
) -> Float[torch.Tensor, "patch d"]:
    """The learned square grid `table` resampled (bilinear, corners aligned) to each image's
    patch grid, patches in the processor's cell-major order, repeated over frames."""
    side = round(table.shape[0] ** 0.5)
    grid = table.view(side, side, -1)
    out = []
    for t, h, w in grid_thw.tolist():
        ys = torch.linspace(0, side - 1, h, device=table.device)
        xs = torch.linspace(0, side - 1, w, device=table.device)
        y0, x0 = ys.floor().long(), xs.floor().long()
        y1, x1 = (y0 + 1).clamp(max=side - 1), (x0 + 1).clamp(max=side - 1)
        dy, dx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
        image = (
            grid[y0][:, x0] * (1 - dy) * (1 - dx)
            + grid[y0][:, x1] * (1 - dy) * dx
            + grid[y1][:, x0] * dy * (1 - dx)
            + grid[y1][:, x1] * dy * dx
        )
        rows_cols = patch_rows_cols(torch.tensor([[t, h, w]]), merge_size).to(table.device)
        out.append(image[rows_cols[:, 0], rows_cols[:, 1]])
    return torch.cat(out)


class HookedQwen3VLVision(HookedQwen2VLVision):
    """Qwen3-VL's ViT: `HookedQwen2VLVision` with learned interpolated positions (added in
    `hook_embed`), GELU (tanh) blocks and DeepStack mergers (`deepstack_mergers.{k}`, each with
    `hook_merged`). `forward` returns the last block's output; `deepstack` the DeepStack
    mergers' outputs of that pass."""

    def __init__(self, cfg: VisionConfig, extras: Qwen3VLVisionExtras):
        super().__init__(cfg, extras)
        self.embed = Qwen2VLPatchEmbed(cfg, extras)
        self.embed.proj.bias = nn.Parameter(torch.zeros(cfg.d_model))
        self.pos_embed = nn.Embedding(extras.num_position_embeddings, cfg.d_model)
        self.deepstack_mergers = nn.ModuleList(
            Qwen3VLMerger(cfg, extras, postshuffle=True) for _ in extras.deepstack_layers
        )
        self.deepstack: list[torch.Tensor] = []

    @staticmethod
    def block(cfg: VisionConfig) -> TransformerBlock:
        """One block: LayerNorm, fused-qkv attention with 2-D rotary, LayerNorm, MLP."""
        return TransformerBlock(
            LayerNorm(cfg.d_model, cfg.eps),
            Attention(cfg.d_model, cfg.n_heads, cfg.n_heads, cfg.d_head, bias=True, rotary=True),
            LayerNorm(cfg.d_model, cfg.eps),
            MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn),
        )

    def forward(
        self,
        pixel_values: Float[torch.Tensor, "patch pixels"],
        grid_thw: Int[torch.Tensor, "image 3"],
    ) -> Float[torch.Tensor, "1 patch d_vision"]:
        positions = interpolated_positions(self.pos_embed.weight, grid_thw, self.extras.merge_size)
        embedded = self.embed(pixel_values)
        resid = self.hook_embed((embedded + positions.to(embedded.dtype))[None])
        rotary = self.rotary(grid_thw, resid.dtype)
        masks = self.block_masks(grid_thw, resid.device)
        self.deepstack = []
        layers = list(self.extras.deepstack_layers)
        for index, (block, mask) in enumerate(zip(self.blocks, masks, strict=True)):
            resid, _ = block(resid, rotary=rotary, mask=mask, is_causal=False)
            if index in layers:
                self.deepstack.append(self.deepstack_mergers[layers.index(index)](resid))
        return self.hook_features(resid)
