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

    `maps`: `[layer, rows, cols]` on the image token grid of image `image` of `inp` (attention
    to the image reshaped to the grid) or on the vision tower's patch grid,
    `inp.image_geometry[image].vision_view` (LLaVA-CAM maps; where image tokens are not
    patches, attention maps too); the two are one grid where each image token is a patch.
    Returns per-layer mass share, the area share, and whether each layer's maximum (the
    pointing game) falls inside the boxes.
    """
    grid = inp.layout.patch_grid(image) if model.image_tokens_are_patches else None
    if grid is not None and tuple(maps.shape[-2:]) == tuple(grid.shape):
        box_positions = torch.cat([inp.patches_in_box(box, image=image) for box in boxes])
        in_box = torch.isin(grid, box_positions.to(grid.device)).cpu()
    else:
        vision = inp.image_geometry[image].vision_view
        in_box = torch.zeros(vision.grid_size, dtype=torch.bool)
        for box in boxes:
            rows, cols = vision.patch_ranges(box)
            in_box[rows.start : rows.stop, cols.start : cols.stop] = True
    maps = maps.float().cpu()
    total = maps.flatten(1).sum(1).clamp(min=1e-12)
    mass = (maps * in_box).flatten(1).sum(1) / total
    hits = in_box.flatten()[maps.flatten(1).argmax(1)]
    return {"mass_in_box": mass, "area_share": in_box.float().mean().item(), "pointing_hit": hits}


def last_row_attention_maps(model: Any, inp: Any) -> Float[torch.Tensor, "layer rows cols"]:
    """The last position's attention to each image patch, mean over heads, on the patch grid
    (batch-1 input). Where image tokens are not patches: the attention to each image token,
    taken to the patches by the family's `tokens_to_patches` (for learned queries, their
    cross-attention to the patches), on the vision tower's grid.

    Examples:
        >>> maps = last_row_attention_maps(model, inp)        # [layer, rows, cols]
        >>> maps.shape
        torch.Size([6, 8, 8])
        >>> box_scores(model, inp, sample.boxes, maps)["pointing_hit"]   # the star's box
        tensor([False,  True,  True, False, False, False])
    """
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    spread_names = model.spread_hook_names()
    with torch.no_grad():
        _, cache = model.run_with_cache(inp, names_filter=names + spread_names)
    rows = torch.stack([cache[name][0, :, -1].mean(0) for name in names])  # [layer, k_pos]
    if model.image_tokens_are_patches:
        grid = inp.layout.patch_grid(0)
        return rows[:, grid.flatten()].reshape(len(names), *grid.shape)
    tokens = rows[:, inp.positions("image")].float().cpu()
    grid_size = inp.image_geometry[0].vision_view.grid_size
    return (tokens @ model.tokens_to_patches(cache)).reshape(len(names), *grid_size)
