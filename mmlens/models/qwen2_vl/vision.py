"""Qwen2-VL's vision tower and patch merger, with TransformerLens hook names under `vision.`.

The tower reads an image of any size (a multiple of 28 px a side) as its own grid of 14 px
patches: a 3-D convolution over two frames (a still image is repeated) embeds each patch, and the
blocks (LayerNorm, fused query/key/value attention with 2-D rotary positions, quick-GELU MLP)
attend within each image only (block-diagonal over `image_grid_thw`). Patches come in the image
processor's order: each 2 x 2 cell's four patches together, cells row-major. The merger
(`Qwen2VLMerger`, the connector) norms every patch, concatenates each cell's four and maps them
to the decoder's width: one image token per cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import nn

from mmlens.components import MLP, Attention, LayerNorm, TransformerBlock
from mmlens.config import VisionConfig
from mmlens.hooks import HookPoint


@dataclass
class Qwen2VLVisionExtras:
    """What Qwen2-VL's tower has beyond a `VisionConfig` (it is `cfg.connector`).

    Attributes:
        merge_size: patches per side of a merged cell (one image token).
        temporal_patch_size: frames per patch (a still image is repeated).
        rope_theta: base of the tower's 2-D rotary frequencies.
        d_out: the merger's output width (the decoder's).
    """

    merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0
    d_out: int = 0


class Qwen2VLPatchEmbed(nn.Module):
    """A bias-free 3-D convolution over each flattened patch ``[C * T * P * P]`` (no positions:
    the blocks rotate by each patch's row and column)."""

    def __init__(self, cfg: VisionConfig, extras: Qwen2VLVisionExtras):
        super().__init__()
        self.shape = (cfg.n_channels, extras.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(
            cfg.n_channels,
            cfg.d_model,
            kernel_size=self.shape[1:],
            stride=self.shape[1:],
            bias=False,
        )

    def forward(self, patches: Float[torch.Tensor, "patch pixels"]) -> torch.Tensor:
        patches = patches.to(self.proj.weight.dtype).view(-1, *self.shape)
        return self.proj(patches).view(patches.shape[0], -1)


def patch_rows_cols(
    grid_thw: Int[torch.Tensor, "image 3"], merge_size: int
) -> Int[torch.Tensor, "patch 2"]:
    """Each patch's (row, column) in its image, in the processor's cell-major order.

    >>> patch_rows_cols(torch.tensor([[1, 2, 4]]), 2)[:, 1].tolist()
    [0, 1, 0, 1, 2, 3, 2, 3]
    """
    rows_cols = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cells = (h // merge_size, merge_size, w // merge_size, merge_size)
        rows = rows.reshape(cells).transpose(1, 2).flatten()
        cols = cols.reshape(cells).transpose(1, 2).flatten()
        rows_cols.append(torch.stack((rows, cols), dim=-1).repeat(t, 1))
    return torch.cat(rows_cols)


def patch_grid_index(
    grid_thw: Int[torch.Tensor, "3"], merge_size: int
) -> Int[torch.Tensor, "rows cols"]:
    """Each patch's row among one image's ``pixel_values`` rows (the processor's cell-major
    order, first frame), arranged as the image's row-major patch grid.

    >>> patch_grid_index(torch.tensor([1, 2, 4]), 2)
    tensor([[0, 1, 4, 5],
            [2, 3, 6, 7]])
    """
    t, h, w = (int(n) for n in grid_thw)
    rows_cols = patch_rows_cols(torch.tensor([[1, h, w]]), merge_size)
    index = torch.empty(h, w, dtype=torch.long)
    index[rows_cols[:, 0], rows_cols[:, 1]] = torch.arange(h * w)
    return index


class HookedQwen2VLVision(nn.Module):
    """Qwen2-VL's ViT. Hooks (batch 1, every image's patches in one sequence): `hook_embed`,
    `blocks.{l}.*` (as the other towers', with `attn.hook_rot_q` / `attn.hook_rot_k`: the 2-D
    rotary), `hook_features` (the last block's output, what the merger reads)."""

    def __init__(self, cfg: VisionConfig, extras: Qwen2VLVisionExtras):
        super().__init__()
        self.cfg, self.extras = cfg, extras
        self.embed = Qwen2VLPatchEmbed(cfg, extras)
        self.hook_embed = HookPoint()  # [1, patch, d_vision]
        self.blocks = nn.ModuleList(self.block(cfg) for _ in range(cfg.n_layers))
        self.hook_features = HookPoint()  # [1, patch, d_vision]
        # Each axis rotates half a head: frequencies of a `d_head / 2`-wide rotary, made on the CPU
        # (real numbers even while the model is built on the meta device), never read from a
        # checkpoint.
        half = cfg.d_head // 2
        dims = torch.arange(0, half, 2, dtype=torch.float32, device="cpu")
        self.register_buffer("inv_freq", 1.0 / extras.rope_theta ** (dims / half), persistent=False)

    @staticmethod
    def block(cfg: VisionConfig) -> TransformerBlock:
        """One block: LayerNorm, fused-qkv attention with 2-D rotary, LayerNorm, MLP."""
        return TransformerBlock(
            LayerNorm(cfg.d_model, cfg.eps),
            Attention(cfg.d_model, cfg.n_heads, cfg.n_heads, cfg.d_head, bias=True, rotary=True),
            LayerNorm(cfg.d_model, cfg.eps),
            MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn),
        )

    def rotary(self, grid_thw: Int[torch.Tensor, "image 3"], dtype: torch.dtype) -> tuple:
        """cos and sin ``[1, patch, d_head]``: the first half of each head's frequencies turn by
        the patch's row, the second by its column."""
        rows_cols = patch_rows_cols(grid_thw.cpu(), self.extras.merge_size)
        device = self.inv_freq.device
        freqs = rows_cols.to(device)[..., None].float() * self.inv_freq.to(device)
        angles = freqs.flatten(1)  # [patch, rows' frequencies then columns']
        angles = torch.cat((angles, angles), dim=-1)[None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def image_mask(grid_thw: Int[torch.Tensor, "image 3"], device: torch.device) -> torch.Tensor:
        """``[1, 1, patch, patch]``: True where both patches belong to the same image."""
        sizes = grid_thw.prod(-1).to(device)
        owner = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)
        return (owner[:, None] == owner[None, :])[None, None]

    def block_masks(
        self, grid_thw: Int[torch.Tensor, "image 3"], device: torch.device
    ) -> list[torch.Tensor | None]:
        """Each block's attention mask (None: every patch sees every patch): here each image's
        patches see their image's."""
        mask = self.image_mask(grid_thw, device) if len(grid_thw) > 1 else None
        return [mask] * len(self.blocks)

    def forward(
        self,
        pixel_values: Float[torch.Tensor, "patch pixels"],
        grid_thw: Int[torch.Tensor, "image 3"],
    ) -> Float[torch.Tensor, "1 patch d_vision"]:
        resid = self.hook_embed(self.embed(pixel_values)[None])
        rotary = self.rotary(grid_thw, resid.dtype)
        masks = self.block_masks(grid_thw, resid.device)
        for block, mask in zip(self.blocks, masks, strict=True):
            resid, _ = block(resid, rotary=rotary, mask=mask, is_causal=False)
        return self.hook_features(resid)


class Qwen2VLMerger(nn.Module):
    """The connector: `ln_q` on every patch, each 2 x 2 cell's four patches concatenated, then a
    GELU MLP to the decoder's width (HF: ``PatchMerger``). Hook: `hook_merged` (``[1, cell,
    4 * d_vision]``, the MLP's input)."""

    def __init__(self, cfg: VisionConfig, extras: Qwen2VLVisionExtras, norm: type = LayerNorm):
        super().__init__()
        self.d_cell = cfg.d_model * extras.merge_size**2
        self.ln_q = norm(cfg.d_model, 1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.d_cell, self.d_cell), nn.GELU(), nn.Linear(self.d_cell, extras.d_out)
        )
        self.hook_merged = HookPoint()

    def forward(
        self, features: Float[torch.Tensor, "1 patch d_vision"]
    ) -> Float[torch.Tensor, "1 cell d_model"]:
        merged = self.hook_merged(self.ln_q(features).reshape(1, -1, self.d_cell))
        return self.mlp(merged)
