"""HookedQwen25VL: Qwen2.5-VL = Qwen2-VL's design with a tower of RMSNorm and SwiGLU blocks that
attend within windows of merged cells except in a few full-attention blocks, and an RMSNorm in
the merger.

Everything else is Qwen2-VL's (`mmlens.models.qwen2_vl`): the image processor and its rows of
flattened patches, the 2 x 2 merger, the 2-D rotary of the tower, the decoder's multimodal
rotary positions (M-RoPE), the template, LLaVA-CAM's patch order and noise.

HF runs the windowed blocks on patches reordered window by window and orders the merged cells
back after the merger. Attention within a window does not depend on the order of the tokens, so
mmlens keeps the processor's order all the way (every vision hook holds the patches as
Qwen2-VL's do) and gives a windowed block a mask: a patch sees the patches of its window,
``window_size`` px square (``window_size / patch_size / merge_size`` cells a side, counted from
the image's top-left; the last windows of a row or column are cut by the image's edge).
Blocks listed in ``fullatt_block_indexes`` see the whole image. Videos are not supported.
HF: `Qwen2_5_VLForConditionalGeneration`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int

from mmlens.components import Attention, GatedMLP, RMSNorm, TransformerBlock
from mmlens.config import MMConfig, VisionConfig
from mmlens.models.qwen2_vl import HookedQwen2VL, qwen_extras_fields, qwen_vision_config
from mmlens.models.qwen2_vl.vision import (
    HookedQwen2VLVision,
    Qwen2VLMerger,
    Qwen2VLVisionExtras,
    patch_rows_cols,
)
from mmlens.models.registry import register


@dataclass
class Qwen25VLVisionExtras(Qwen2VLVisionExtras):
    """`Qwen2VLVisionExtras` and the tower's windows.

    Attributes:
        window_size: a window's side in pixels (HF's ``window_size``: 112 in the releases,
            4 x 4 cells of 28 px).
        fullatt_block_indexes: the blocks that attend over the whole image.
    """

    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()


def window_ids(
    grid_thw: Int[torch.Tensor, "image 3"], merge_size: int, window_cells: int
) -> Int[torch.Tensor, "patch"]:
    """Each patch's window (numbered over all images), patches in the processor's order.

    >>> window_ids(torch.tensor([[1, 4, 6]]), 2, 2).tolist()   # 2 x 3 cells: windows 0, 0, 1
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    """
    ids, first = [], 0
    for t, h, w in grid_thw.tolist():
        rows_cols = patch_rows_cols(torch.tensor([[t, h, w]]), merge_size)
        window = rows_cols // (merge_size * window_cells)  # [patch, (window row, column)]
        across = -(-(w // merge_size) // window_cells)  # windows a row
        ids.append(first + window[:, 0] * across + window[:, 1])
        first += -(-(h // merge_size) // window_cells) * across
    return torch.cat(ids)


class HookedQwen25VLVision(HookedQwen2VLVision):
    """Qwen2.5-VL's ViT: `HookedQwen2VLVision` (hooks, rotary, the processor's patch order)
    with RMSNorm and SwiGLU blocks (``mlp.gate_proj`` / ``up_proj`` / ``down_proj``, biased)
    and window attention outside `fullatt_block_indexes`."""

    @staticmethod
    def block(cfg: VisionConfig) -> TransformerBlock:
        """One block: RMSNorm, fused-qkv attention with 2-D rotary, RMSNorm, SwiGLU."""
        return TransformerBlock(
            RMSNorm(cfg.d_model, cfg.eps),
            Attention(cfg.d_model, cfg.n_heads, cfg.n_heads, cfg.d_head, bias=True, rotary=True),
            RMSNorm(cfg.d_model, cfg.eps),
            GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, bias=True),
        )

    def block_masks(
        self, grid_thw: Int[torch.Tensor, "image 3"], device: torch.device
    ) -> list[torch.Tensor | None]:
        """Full-attention blocks: each image's patches see their image's; the others: their
        window's (`window_ids`)."""
        extras = self.extras
        cells = extras.window_size // self.cfg.patch_size // extras.merge_size
        windows = window_ids(grid_thw.cpu(), extras.merge_size, cells).to(device)
        window_mask = (windows[:, None] == windows[None, :])[None, None]
        image_mask = self.image_mask(grid_thw, device) if len(grid_thw) > 1 else None
        return [
            image_mask if index in extras.fullatt_block_indexes else window_mask
            for index in range(len(self.blocks))
        ]


@register("qwen2_5_vl")
class HookedQwen25VL(HookedQwen2VL):
    """Qwen2.5-VL with hooks in the decoder, the vision tower (`vision.`, as Qwen2-VL's: all
    images' patches in one sequence of batch 1, in the processor's order) and the merger
    (`merger.`); see `HookedQwen2VL`.

    Examples:
        >>> from mmlens.testing import build_tiny_qwen2_5_vl
        >>> qwen = mmlens.from_pretrained(build_tiny_qwen2_5_vl("checkpoints/qwen2.5-vl"))
        >>> type(qwen).__name__, qwen.cfg.connector.fullatt_block_indexes
        ('HookedQwen25VL', (1,))
    """

    @classmethod
    def vision_from_hf(cls, hf_vision: Any) -> tuple[VisionConfig, Qwen25VLVisionExtras]:
        """The tower (``hidden_size`` wide, an ``intermediate_size`` SwiGLU) and its windows."""
        vision = qwen_vision_config(
            hf_vision,
            d_model=hf_vision.hidden_size,
            d_mlp=hf_vision.intermediate_size,
            kind="qwen2_5_vl",
        )
        extras = Qwen25VLVisionExtras(
            **qwen_extras_fields(hf_vision, hf_vision.out_hidden_size),
            window_size=hf_vision.window_size,
            fullatt_block_indexes=tuple(hf_vision.fullatt_block_indexes),
        )
        return vision, extras

    def build_connector(self, cfg: MMConfig) -> None:
        """Qwen2.5-VL's tower and the merger with an RMSNorm."""
        self.vision = HookedQwen25VLVision(cfg.vision, cfg.connector)
        self.merger = Qwen2VLMerger(cfg.vision, cfg.connector, norm=RMSNorm)
