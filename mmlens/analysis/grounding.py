"""Grounding: how much of a map over the image (LLaVA-CAM, attention) lies on the ground-truth
boxes of the objects a question is about, and the attention maps it is measured on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float

from mmlens.inputs import Box


def box_scores(
    model: Any,
    inp: Any,
    boxes: Sequence[Box],
    maps: torch.Tensor,
    image: int = 0,
) -> dict:
    """How much of each map's mass lies on the patches of `boxes`, against their area share.

    `maps`: `[layer, rows, cols]` on the patch grid of image `image` of `inp` (LLaVA-CAM maps or
    attention to the image reshaped to the grid). Returns per-layer mass share, the area share,
    and whether each layer's maximum (the pointing game) falls inside the boxes.
    """
    grid = inp.layout.patch_grid(image)
    box_positions = torch.cat([inp.patches_in_box(box, image=image) for box in boxes])
    in_box = torch.isin(grid, box_positions.to(grid.device)).cpu()
    maps = maps.float().cpu()
    total = maps.flatten(1).sum(1).clamp(min=1e-12)
    mass = (maps * in_box).flatten(1).sum(1) / total
    hits = in_box.flatten()[maps.flatten(1).argmax(1)]
    return {"mass_in_box": mass, "area_share": in_box.float().mean().item(), "pointing_hit": hits}


def last_row_attention_maps(model: Any, inp: Any) -> Float[torch.Tensor, "layer rows cols"]:
    """The last position's attention to each image patch, mean over heads, on the patch grid
    (batch-1 input).

    Examples:
        >>> maps = last_row_attention_maps(model, inp)        # [layer, rows, cols]
        >>> maps.shape
        torch.Size([6, 8, 8])
        >>> box_scores(model, inp, sample.boxes, maps)["pointing_hit"]   # the star's box
        tensor([False,  True,  True, False, False, False])
    """
    grid = inp.layout.patch_grid(0)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(inp, names_filter=names)
    rows = torch.stack([cache[name][0, :, -1].mean(0) for name in names])  # [layer, k_pos]
    return rows[:, grid.flatten()].reshape(len(names), *grid.shape)
